"""Single-sequence decode steps of `forward_with_cache` through torch.compile, on CPU
(`LoadOptions.compile_decode`).

Outside its GEMVs, an eager decode step of a small model is fixed cost: ~30 small ops per layer
(norms, RoPE, residuals, the K/V store), each dispatched from Python. Inductor fuses the
element-wise work into a few C++ loops per layer and calls the same BLAS and SDPA kernels from a C++
wrapper, so the step computes what the eager one does (within float32 rounding) in less time
(SmolLM2 at context 512 on 2 cores: 25.5 vs 32.5 ms).

Shapes: the step is compiled once at Load with dynamic shapes, so one graph serves every start
position. Dynamo specializes sizes and integers equal to 0 or 1, so the compiled graph is used for
batch 1, one token, start_pos >= 2; everything else (prefill, batches, the first two positions)
runs eagerly and never triggers a compile during a call. The compiled code lives in the process
(a second Load of the same shapes reuses it) and inductor's on-disk cache
(TORCHINDUCTOR_CACHE_DIR, default /tmp/torchinductor_<user>) keeps it across processes.

The paged path stays eager: its backends' per-call plans compile into slower code than they run
eagerly (measured: 54 vs 33 ms on SmolLM2).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from registry import InvalidConfig, ModelConfig

from .kv_cache import ContiguousContext, ContiguousKvCache
from .layers import RotaryEmbedding

# The first start position the compiled graph serves (0 and 1 would be specialized constants).
FIRST_COMPILED_POSITION = 2
RECOMPILE_LIMIT = 64


def check_compilable(
    config: ModelConfig, device: torch.device, network: nn.Module, tensor_parallel: bool
) -> None:
    """INVALID_ARGUMENT before any compile work when compile_decode cannot apply to this model."""
    if device.type != "cpu":
        raise InvalidConfig(
            f"compile_decode is for CPU models (this Load is on {device}); CUDA decode steps replay CUDA "
            "graphs instead (see enforce_eager)"
        )
    if tensor_parallel:
        raise InvalidConfig(
            "compile_decode does not support tensor parallelism (its collectives are not compiled)"
        )
    if not getattr(network, "cuda_graph_safe", True):
        raise InvalidConfig(
            f"compile_decode does not support {config.architecture}: its MoE blocks read expert counts on "
            "the host every step, which splits the compiled graph"
        )


class CompiledDecode:
    """The compiled network body for `forward_with_cache` decode steps of one sequence."""

    def __init__(self, body: nn.Module, cache: ContiguousKvCache, rotary: RotaryEmbedding) -> None:
        # Every network class shares its forward's code object, and Dynamo keeps at most
        # recompile_limit graphs per code object (then runs it eagerly): room for the shapes of
        # many models loaded over a worker's life.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # Called as the eager body is: (input_ids, positions, rotary, context) → hidden states.
        # cpp_wrapper: the graph's ~180 matmul and attention calls are made from C++, not from
        # generated Python (SmolLM2: 25.5 vs 27.7 ms a step; a cold compile 64 vs 45 s).
        self.module = torch.compile(body, dynamic=True, options={"cpp_wrapper": True})
        self._cache = cache
        self._rotary = rotary
        self.compile_seconds = 0.0

    def applies(self, batch: int, seq_len: int, start_pos: int) -> bool:
        return batch == 1 and seq_len == 1 and start_pos >= FIRST_COMPILED_POSITION

    @staticmethod
    def inputs(ids: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's ids and positions as the graph was compiled for them: contiguous inference
        tensors (a caller's tensor made outside inference mode, or an expanded arange, would fail
        the graph's guards on dispatch keys and strides and compile again)."""
        with torch.inference_mode():
            return ids.clone(memory_format=torch.contiguous_format), pos.clone(
                memory_format=torch.contiguous_format
            )

    @torch.inference_mode()
    def warm_up(self, device: torch.device) -> float:
        """Compile now (at Load, not during a caller's first step) with steps at
        FIRST_COMPILED_POSITION and the next position of row 0; returns the seconds it took. The
        slots they write lie beyond every row's filled length (nothing reads them before a call
        overwrites them); they are zeroed so the cache reads as it did."""
        cache = self._cache
        if cache.max_seq_len <= FIRST_COMPILED_POSITION:
            return 0.0  # no decode step would use the graph
        started = time.perf_counter()
        ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        # Dynamo first compiles the start position as a constant, then, seeing a second one, the
        # graph for any position: both steps here, so no caller's step compiles.
        positions = (FIRST_COMPILED_POSITION, FIRST_COMPILED_POSITION + 1)
        for p in positions:
            if p < cache.max_seq_len:
                pos = torch.full((1, 1), p, dtype=torch.long, device=device)
                self.module(*self.inputs(ids, pos), self._rotary, ContiguousContext(cache, p))
        for t in cache.k + cache.v:
            t[0, :, FIRST_COMPILED_POSITION : positions[-1] + 1].zero_()
        self.compile_seconds = time.perf_counter() - started
        return self.compile_seconds
