"""The `triton` backend: our own Triton kernels over the paged cache (architectures/backends/
triton_kernels.py), for CUDA, and for the CPU under TRITON_INTERPRET=1 (how the tests prove them).

- K/V store: one kernel writes every new token's K and V into its slot (slot -1 skipped).
- Decode-only calls: the split-K decode kernel, with the split count chosen from the longest
  context (a fixed count when a CUDA graph is captured; see `decode_splits`).
- Anything else (prefill, cached prefix, mixed): one varlen kernel over tiles of queries.

Block sizes: any (keys are read slot by slot through the block table). Dtypes: float16, bfloat16,
float32. Sliding windows, GQA, and logit softcapping (`softcap` > 0, Gemma 2's
`softcap * tanh(scores / softcap)` after the scale).

triton is imported when the backend is built, never when this module is imported.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from ..paged import PagedBatch, PagedKvCache

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRET_ENV = "TRITON_INTERPRET"
DECODE_SPLIT_KEYS = 512  # keys per split of the decode kernel before it splits further
MAX_DECODE_SPLITS = 16


def interpreter_enabled() -> bool:
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """None when the triton backend can serve a model on `device` in `dtype`, else why not."""
    if dtype is not None and dtype not in TRITON_DTYPES:
        return f"it needs float16, bfloat16 or float32, and the model's dtype is {str(dtype).removeprefix('torch.')}"
    if device.type == "cpu":
        if not interpreter_enabled():
            return (
                f"on the CPU it runs only under the Triton interpreter: set {INTERPRET_ENV}=1 in the "
                "worker's environment (slow; meant for tests)"
            )
        if _imported_compiled():
            return (
                f"triton was imported before {INTERPRET_ENV}=1 was set, so its own helpers are compiled "
                "ones: set the variable when the worker starts"
            )
    elif device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
    else:
        return f"it needs a CUDA device (or the CPU under {INTERPRET_ENV}=1), and the model is on {device}"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install 'modelworker[triton]')"
    return None


def load_kernels(interpret: bool) -> ModuleType:
    """triton_kernels.py, one copy per mode: `@triton.jit` reads TRITON_INTERPRET when the module
    runs, so compiled and interpreted kernels live in two modules and a process can hold both
    (the caller has the variable set, or not, accordingly)."""
    name = f"{__package__}.triton_kernels" + ("_interpreted" if interpret else "")
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("triton_kernels.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def _imported_compiled() -> bool:
    """triton.language already imported without the interpreter (its helpers, such as tl.zeros, are
    decorated at import). Never imports triton itself."""
    tl = sys.modules.get("triton.language")
    if tl is None:
        return False
    interpreter = sys.modules.get("triton.runtime.interpreter")
    return interpreter is None or not isinstance(getattr(tl, "zeros", None), interpreter.InterpretedFunction)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def decode_splits(max_context_len: int) -> int:
    """Split count of a decode call whose longest context is `max_context_len` keys."""
    return max(1, min(MAX_DECODE_SPLITS, -(-max_context_len // DECODE_SPLIT_KEYS)))


@dataclass
class TritonPlan:
    decode: bool
    num_splits: int  # decode only
    query_lens: list[int]
    # Varlen tiles per GQA group count: (tile → sequence, tile → first query index), on the device.
    tiles: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    # Decode partials [num_seqs, num_heads, num_splits] (+ head_dim), allocated on the first layer.
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class TritonBackend:
    name = "triton"

    def __init__(self, *, block_m: int = 64, block_n: int = 64) -> None:
        self.interpret = interpreter_enabled()
        self._k = load_kernels(self.interpret)
        self.block_m = block_m
        self.block_n = block_n
        self.fixed_splits: int | None = None  # set while a CUDA graph is captured and replayed

    # -- per call ------------------------------------------------------------------------------
    def plan(self, cache: PagedKvCache, batch: PagedBatch) -> TritonPlan:
        decode = batch.is_decode_only
        if self.fixed_splits is not None:
            splits = self.fixed_splits
        else:
            splits = decode_splits(batch.max_context_len) if decode else 1
        return TritonPlan(decode=decode, num_splits=splits, query_lens=batch.query_lens)

    def store(
        self, cache: PagedKvCache, layer_idx: int, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch
    ) -> None:
        """k/v [num_tokens, Hkv, D] into their slots (batch.slot_mapping; -1 skipped)."""
        k_flat, v_flat = cache.flat_k(layer_idx), cache.flat_v(layer_idx)
        k = _last_dim_contiguous(k.to(k_flat.dtype))
        v = _last_dim_contiguous(v.to(v_flat.dtype))
        n = k.shape[0]
        if n == 0:
            return
        block_t = 16
        self._k.store_kv_kernel[(-(-n // block_t),)](
            k, v, k_flat, v_flat, batch.slot_mapping, n,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            NUM_KV_HEADS=cache.num_kv_heads, HEAD_DIM=cache.head_dim,
            BLOCK_T=block_t, BLOCK_H=_pow2(cache.num_kv_heads), BLOCK_D=_pow2(cache.head_dim),
        )  # fmt: skip

    def attend(
        self,
        cache: PagedKvCache,
        layer_idx: int,
        q: torch.Tensor,
        batch: PagedBatch,
        plan: TritonPlan,
        window: int | None,
        scale: float,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        """q [num_tokens, H, D] → [num_tokens, H, D], reading every key from the cache."""
        k_flat, v_flat = cache.flat_k(layer_idx), cache.flat_v(layer_idx)
        q = _last_dim_contiguous(q.to(k_flat.dtype))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        n_kv, d = cache.num_kv_heads, cache.head_dim
        groups = q.shape[1] // n_kv
        block_d = max(16, _pow2(d))
        # Smaller tiles for wide heads: q, k, v and the accumulator must fit in shared memory/registers.
        block_n = self.block_n if block_d <= 128 else min(self.block_n, 32)
        common = dict(
            BLOCK_SIZE=cache.block_size,
            NUM_KV_HEADS=n_kv,
            GROUPS=groups,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            USE_WINDOW=window is not None,
            USE_SOFTCAP=softcap > 0,
            UPCAST=self.interpret or k_flat.dtype == torch.float32,
        )
        win = 0 if window is None else int(window)
        table = batch.block_table
        if plan.decode:
            num_seqs, splits = batch.num_seqs, plan.num_splits
            if plan.partials is None and splits > 1:
                heads = q.shape[1]
                dev = q.device
                plan.partials = (
                    torch.empty(num_seqs, heads, splits, d, dtype=torch.float32, device=dev),
                    torch.empty(num_seqs, heads, splits, dtype=torch.float32, device=dev),
                    torch.empty(num_seqs, heads, splits, dtype=torch.float32, device=dev),
                )
            acc, mx, sm = plan.partials if splits > 1 else (out, out, out)  # unused when single
            self._k.decode_attention_kernel[(num_seqs, n_kv, splits)](
                out, acc, mx, sm, q, k_flat, v_flat, table, batch.context_lens_t,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), table.stride(0),
                splits, scale, float(softcap), win,
                BLOCK_G=max(16, _pow2(groups)), SINGLE_SPLIT=splits == 1, **common,
            )  # fmt: skip
            if splits > 1:
                self._k.reduce_splits_kernel[(num_seqs, q.shape[1])](
                    out, acc, mx, sm, out.stride(0), out.stride(1), splits,
                    NUM_HEADS=q.shape[1], HEAD_DIM=d, BLOCK_D=_pow2(d), BLOCK_S=_pow2(splits),
                )  # fmt: skip
            return out
        tile_seq, tile_start, block_q = self._tiles(plan, groups, q.device, block_d)
        block_m = max(16, _pow2(block_q * groups))
        self._k.varlen_attention_kernel[(tile_seq.shape[0], n_kv)](
            out, q, k_flat, v_flat, table, batch.cu_query_lens, batch.context_lens_t, tile_seq, tile_start,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), table.stride(0),
            scale, float(softcap), win,
            BLOCK_Q=block_q, BLOCK_M=block_m, **common,
        )  # fmt: skip
        return out

    def _tiles(
        self, plan: TritonPlan, groups: int, device: torch.device, block_d: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Each sequence's queries cut into tiles of block_q (block_q * groups rows ≤ block_m)."""
        cached = plan.tiles.get(groups)
        if cached is None:
            block_m = self.block_m if block_d <= 128 else min(self.block_m, 32)
            block_q = max(1, block_m // _pow2(groups))
            qlens = np.asarray(plan.query_lens, dtype=np.int64)
            per_seq = -(-qlens // block_q)
            seq = np.repeat(np.arange(qlens.size), per_seq)
            first_tile = np.concatenate([[0], np.cumsum(per_seq)[:-1]])
            start = (np.arange(seq.size) - first_tile[seq]) * block_q
            both = torch.from_numpy(np.concatenate([seq, start]).astype(np.int32)).to(device)
            cached = (both[: seq.size], both[seq.size :], block_q)
            plan.tiles[groups] = cached
        return cached


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
