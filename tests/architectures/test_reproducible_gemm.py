"""MKL_CBWR: a forward's bits do not depend on the thread count of the compute thread running it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_forward_gives_the_same_bits_on_one_thread_as_on_two() -> None:
    """Importing architectures sets MKL_CBWR before the first GEMM, so a 6-row matmul (a prefill of
    the worker's test models) does not change with the thread count of the compute thread running
    it. A fresh interpreter: MKL reads the variable once, at its first call."""
    code = """
import os, torch, torch.nn.functional as F
import architectures
assert os.environ["MKL_CBWR"] == "AUTO,STRICT", os.environ["MKL_CBWR"]
gen = torch.Generator().manual_seed(0)
for rows, out, inp in [(6, 64, 64), (6, 192, 64), (7, 1536, 576)]:
    w, x = torch.randn(out, inp, generator=gen), torch.randn(rows, inp, generator=gen)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(F.linear(x, w))
    assert torch.equal(*results), (rows, out, inp)
print("same bits")
"""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "same bits", done.stderr
