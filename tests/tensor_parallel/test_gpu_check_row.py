"""`make gpu-check`'s tensor-parallel row (bench/gpu_tensor_parallel.py): skipped with fewer than two
GPUs (and on the CPU), and its whole path — checkpoint, slice loads, logits against one rank, paged
decode timings — run here over gloo with a tiny shape."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_check
from bench.gpu_tensor_parallel import SHAPE, format_result, report, run

TINY = {
    **SHAPE,
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_row_is_skipped_with_fewer_than_two_gpus(gpus: int) -> None:
    text, failed = report(gpus)
    assert not failed
    assert text == f"tensor parallelism: skipped ({gpus} CUDA GPU visible; the TP row needs 2 or more)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of gpu-check")
def test_gpu_check_on_the_cpu_skips_tensor_parallelism_too(capsys) -> None:
    if gpu_check.nvidia_smi_gpus():
        pytest.skip("a driver sees a GPU torch cannot use: gpu-check fails loudly instead")
    assert gpu_check.main(["--skip-tests"]) == 0
    out = capsys.readouterr().out
    assert (
        "no CUDA: skipping the GPU checks (pytest -m gpu, flash_attn, decode timings, tensor parallelism)"
        in out
    )


def test_the_row_runs_over_gloo_on_the_cpu() -> None:
    result = run(
        2, "cpu", TINY, prompt=8, context=20, batch_sizes=(1, 2), block_size=16, iters=1, timeout=300
    )
    assert result["max_error"] <= 1e-4 * result["max_logit"]
    assert set(result["tp1_ms"]) == set(result["tpn_ms"]) == {1, 2}
    assert all(ms > 0 for ms in (*result["tp1_ms"].values(), *result["tpn_ms"].values()))
    text, failed = format_result(2, result)
    assert not failed
    assert "logits TP=2 vs TP=1, float32" in text and "ok, limit 0.0001" in text
    assert text.count("- decode step bfloat16") == 2
