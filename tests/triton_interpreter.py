"""Whether this test process runs Triton kernels under the interpreter (TRITON_INTERPRET=1 set
before triton was first imported; tests/conftest.py does it on machines without CUDA)."""

from __future__ import annotations

import os

import pytest


def interpreter_ready() -> str | None:
    """None when interpreted kernels can run here, else why not."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET=1 is not set (a CUDA machine: the gpu tests run the compiled kernels)"
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as exc:
        return f"triton is not installed: {exc}"
    if not isinstance(tl.zeros, InterpretedFunction):
        return "triton was imported before TRITON_INTERPRET=1 was set"
    return None


needs_interpreter = pytest.mark.skipif(
    interpreter_ready() is not None, reason=f"Triton interpreter: {interpreter_ready()}"
)
