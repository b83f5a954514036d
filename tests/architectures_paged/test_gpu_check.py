"""bench/gpu_check.py on a machine without CUDA: it says so and exits 0 quickly, and its measuring
code (attention error, random-weight model on the device, decode timing, table) runs end to end on
CPU with a tiny shape, so the script is known to work before a GPU machine is lent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]
TINY = {
    **gpu_check.LLAMA_1B,
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def _fake_nvidia_smi(bin_dir: Path, lines: str) -> None:
    """An `nvidia-smi` on PATH that lists the given GPUs (`-L`)."""
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\nprintf '{lines}'\n")
    exe.chmod(0o755)


def test_without_cuda_it_skips_and_exits_zero(tmp_path: Path) -> None:
    _fake_nvidia_smi(tmp_path, "")  # a driver that sees no GPU
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA: skipping the GPU checks" in result.stdout
    # At once: no gpu test run, no table, no result file (checked by what it printed, not by time).
    assert "gpu tests:" not in result.stdout and "written to" not in result.stdout


def test_a_gpu_torch_cannot_use_fails_loudly(tmp_path: Path) -> None:
    """nvidia-smi lists a GPU, torch sees none (here: the CPU build, or a CUDA too new for the
    driver): exit 1 with the reason, not a green "no CUDA"."""
    if torch.cuda.is_available():
        pytest.skip("torch sees the GPU here")
    _fake_nvidia_smi(tmp_path, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\\n")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: nvidia-smi sees 1 GPU(s) (GPU 0: NVIDIA H100 80GB HBM3" in result.stderr
    assert "torch.cuda.is_available() is False" in result.stderr
    assert "no CUDA: skipping" not in result.stdout


@pytest.mark.parametrize(
    ("gpus", "sees", "env", "expect"),
    [
        (None, False, {}, None),  # no driver
        ([], False, {}, None),  # a driver without GPUs
        (["GPU 0: A100"], True, {}, None),
        (["GPU 0: A100"], False, {"CUDA_VISIBLE_DEVICES": ""}, None),  # hidden on purpose
        (["GPU 0: A100"], False, {"CUDA_VISIBLE_DEVICES": "-1"}, None),
        (["GPU 0: A100"], False, {}, "nvidia-smi sees 1 GPU(s) (GPU 0: A100)"),
        (["GPU 0: A100"], False, {"CUDA_VISIBLE_DEVICES": "0"}, "torch.cuda.is_available() is False"),
    ],
)
def test_unusable_gpu_reason(gpus, sees: bool, env: dict, expect: str | None) -> None:
    reason = gpu_check.unusable_gpu_reason(gpus, sees, env)
    assert (reason is None) == (expect is None) and (expect is None or expect in reason), reason


def test_only_the_gpu_marked_files_are_collected() -> None:
    files = {p.relative_to(REPO).as_posix() for p in gpu_check.gpu_test_files()}
    assert "tests/architectures_paged/test_gpu.py" in files
    assert "tests/observability/test_gpu_metrics.py" in files
    assert (
        "tests/architectures_paged/test_backends.py" not in files and "tests/worker/test_rpcs.py" not in files
    )


def test_make_gpu_check_with_a_python_installs_nothing() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # A clean make environment: under `make test` the outer make's MAKEFLAGS/MAKELEVEL would make this
    # one print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    dry = subprocess.run(
        ["make", "-n", "gpu-check", "GPU_CHECK_PYTHON=/opt/gpu-env/bin/python", "VENV=/nonexistent-venv"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip().splitlines() == ["/opt/gpu-env/bin/python -m bench.gpu_check"]


def test_measurements_run_end_to_end_on_cpu() -> None:
    rows = gpu_check.measure(
        torch.device("cpu"),
        (torch.float32,),
        ["torch", "flash_attn"],
        shape=TINY,
        batch_sizes=(1, 3),
        context=20,
        block_size=16,
        iters=2,
        attention_kwargs=dict(num_heads=4, num_kv_heads=2, head_dim=8),
    )
    ok, flash = rows
    assert ok.failure is None and ok.max_error is not None and ok.max_error <= 1e-5
    assert set(ok.decode_ms) == {1, 3} and all(ms > 0 for ms in ok.decode_ms.values())
    # A backend that cannot run is reported in its row; the other rows are still measured.
    assert flash.failure is not None and "flash_attn cannot run" in flash.failure
    table = gpu_check.format_table("cpu", rows, (1, 3))
    assert (
        table.splitlines()[0]
        == "| card | backend | dtype | max err vs fp64 ref | decode ms @ batch 1 | decode ms @ batch 3 |"
    )
    assert (
        f"| cpu | torch | float32 | {ok.max_error:.2e} | {ok.decode_ms[1]:.2f} | {ok.decode_ms[3]:.2f} |"
        in table
    )
    assert "failed: InvalidArgument: attention_backend flash_attn cannot run" in table


def test_random_network_is_built_on_the_device_with_the_shape() -> None:
    net = gpu_check.build_network(TINY, torch.device("cpu"), torch.bfloat16)
    assert net.lm_head.weight.shape == (64, 32) and net.lm_head.weight.dtype == torch.bfloat16
    assert 0.01 < float(net.model.layers[0].mlp.down_proj.weight.float().std()) < 0.03


def test_quantized_rows_run_on_cpu() -> None:
    """The int8/int4/fp8 rows, with the CPU kernels where the tiny shapes allow them."""
    from bench import gpu_quantized

    table, failed = gpu_quantized.report(
        torch.device("cpu"),
        lambda dt: gpu_check.build_network(TINY, torch.device("cpu"), dt),
        TINY,
        (1, 2),
        context=20,
        block_size=16,
        iters=1,
    )
    assert not failed, table
    rows = table.splitlines()[2:]
    assert [r.split(" | ")[0].strip("| ") for r in rows] == ["bfloat16", "int8", "int4", "fp8"]
    assert "cpu-int8pack" in rows[1] and "cpu-int4pack" in rows[2] and "dequantize" in rows[3]
