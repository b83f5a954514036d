"""FlashAttention-2 over the paged cache (the flash-attn package, CUDA, fp16/bf16).

- Prefill and mixed batches: `flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q,
  cu_seqlens_k, ..., block_table=...)`: the kernel reads each sequence's keys through its block
  table; `cu_seqlens_k` are cumulative context lengths.
- Decode batches (one query per sequence): `flash_attn_with_kvcache(q[:, None], k_cache, v_cache,
  cache_seqlens=context_lens, block_table=...)`. The new K/V are already stored, so k/v are not
  passed and the kernel only reads.

Both align the causal mask bottom-right (query i of L sees keys up to context_len - L + i), which
is our "queries are the last query_len of context_len". A window w ("a query at p sees keys in
(p - w, p]") is window_size=(w - 1, 0): flash-attn keeps keys in [p - left, p + right].

flash_attn is imported here, and only when the backend is selected, never at module import.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import sys
from dataclasses import dataclass
from typing import Any

import torch

from registry.backends import BackendRequirements

from ..paged_batch import PagedBatch, PagedKvCache

FLASH_BLOCK_MULTIPLE = 256  # FA2's paged KV requires page_block_size % 256 == 0
FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256
# Compute capability majors the flash-attn build carries code for: sm_80 (also runs on sm_86/sm_89)
# and sm_90 (the Dockerfile's FLASH_ATTN_CUDA_ARCHS="80;90"). On sm_100/sm_120 its kernels would
# fail at the first call ("no kernel image"), so the backend refuses at Load instead.
FLASH_ARCH_MAJORS = (8, 9)
# 2.6.0 and 2.6.1 freed the split-KV accumulators too early (fixed in 2.6.2); decode uses split-KV.
FLASH_MIN_VERSION = (2, 6, 2)
FLASH_INSTALL_HINT = "after torch: pip install flash-attn==2.8.3 --no-build-isolation"


def _import_flash() -> tuple[Any, Any]:
    module = importlib.import_module("flash_attn")
    return module.flash_attn_varlen_func, module.flash_attn_with_kvcache


def flash_attn_unavailable_reason(
    device: torch.device, dtype: torch.dtype | None, block_size: int | None, head_dim: int | None
) -> str | None:
    """None when the flash backend can serve a model with these settings, else why not.

    The settings come first (they are what a Load can change), then the machine; the package is
    only imported on a CUDA machine where it could run.
    """
    if device.type != "cuda":
        return f"it needs a CUDA device, and the model is on {device}"
    if dtype is not None and dtype not in FLASH_DTYPES:
        return f"it needs float16 or bfloat16, and the model's dtype is {str(dtype).removeprefix('torch.')}"
    if block_size is not None and block_size % FLASH_BLOCK_MULTIPLE:
        return (
            f"kv_cache.block_size {block_size} is not a multiple of {FLASH_BLOCK_MULTIPLE} "
            "(FlashAttention-2's paged KV cache requires it)"
        )
    if head_dim is not None and (head_dim % 8 or head_dim > FLASH_MAX_HEAD_DIM):
        return f"head_dim {head_dim} is not a multiple of 8 up to {FLASH_MAX_HEAD_DIM}"
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major < 8:
        return f"FlashAttention-2 needs compute capability 8.0 or newer, and this GPU has {major}.{minor}"
    if major not in FLASH_ARCH_MAJORS:
        return (
            f"flash-attn's kernels are built for sm_80 and sm_90 (Ampere, Ada, Hopper), and this GPU is "
            f"sm_{major}{minor} (compute capability {major}.{minor})"
        )
    if importlib.util.find_spec("flash_attn") is None:
        return f"the flash-attn package is not installed ({FLASH_INSTALL_HINT})"
    try:
        varlen, _ = _import_flash()
    except Exception as exc:  # a broken build raises ImportError, OSError or RuntimeError
        return f"the flash-attn package does not load: {type(exc).__name__}: {exc}"
    version = _version_tuple(getattr(sys.modules.get("flash_attn"), "__version__", None))
    if version is not None and version < FLASH_MIN_VERSION:
        return (
            f"flash-attn {'.'.join(map(str, version))} is too old: before 2.6.2 its split-KV decode freed "
            f"buffers too early ({FLASH_INSTALL_HINT})"
        )
    if "block_table" not in inspect.signature(varlen).parameters:
        return "the installed flash-attn has no paged KV support in flash_attn_varlen_func (needs >= 2.6.2)"
    return None


def flash_attn_probe(requirements: BackendRequirements) -> str | None:
    r = requirements
    return flash_attn_unavailable_reason(r.device, r.dtype, r.block_size, r.head_dim)


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    """'2.8.3' / '2.6.1.post1' → (2, 8, 3) / (2, 6, 1); None when absent or not numeric."""
    if not text:
        return None
    parts = []
    for piece in str(text).split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            return None
        parts.append(int(digits))
    return tuple(parts)


@dataclass
class FlashPlan:
    decode: bool


class FlashAttnBackend:
    name = "flash_attn"

    def __init__(self) -> None:
        self._varlen, self._with_kvcache = _import_flash()

    def plan(self, cache: PagedKvCache, batch: PagedBatch) -> FlashPlan:
        return FlashPlan(decode=batch.is_decode_only)

    def attend(
        self,
        cache: PagedKvCache,
        layer_idx: int,
        q: torch.Tensor,
        batch: PagedBatch,
        plan: FlashPlan,
        window: int | None,
        scale: float,
        softcap: float | None = None,
    ) -> torch.Tensor:
        k_cache, v_cache = cache.k[layer_idx], cache.v[layer_idx]  # [blocks, block_size, Hkv, D]
        q = q.to(k_cache.dtype)
        window_size = (-1, -1) if window is None else (window - 1, 0)
        cap = 0.0 if softcap is None else softcap  # flash-attn's "off" is 0.0 (>= 2.6, like block_table)
        if plan.decode:
            # q [B, H, D] → [B, 1, H, D]: one query per sequence, at its last position.
            out = self._with_kvcache(
                q.unsqueeze(1),
                k_cache,
                v_cache,
                cache_seqlens=batch.context_lens_t,
                block_table=batch.block_table,
                softmax_scale=scale,
                causal=True,
                window_size=window_size,
                softcap=cap,
            )
            return out.squeeze(1)
        return self._varlen(
            q,
            k_cache,
            v_cache,
            cu_seqlens_q=batch.cu_query_lens,
            cu_seqlens_k=batch.cu_context_lens,
            max_seqlen_q=batch.max_query_len,
            max_seqlen_k=batch.max_context_len,
            softmax_scale=scale,
            causal=True,
            window_size=window_size,
            softcap=cap,
            block_table=batch.block_table,
        )
