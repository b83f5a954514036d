"""bench/gpu_check.py on a machine without CUDA: it says so and exits 0 quickly, and its measuring
code (attention error, random-weight model on the device, decode timing, table) runs end to end on
CPU with a tiny shape, so the script is known to work before a GPU machine is lent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

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


def test_without_cuda_it_skips_and_exits_zero() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    start = time.monotonic()
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
    assert time.monotonic() - start < 30


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
