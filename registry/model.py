"""The Model interface every architecture implements, and the options a builder receives."""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig


@dataclass(frozen=True)
class KvCacheOptions:
    """KV cache sizing; 0 / None means "the model's default" (see the proto's KvCacheConfig)."""

    block_size: int = 0
    num_blocks: int = 0
    max_bytes: int = 0
    max_seq_len: int = 0
    max_batch_size: int = 0


@dataclass(frozen=True)
class LoadOptions:
    """Everything besides the directory that decides how a model is built. Part of a load's spec."""

    dtype: torch.dtype | None = None  # None: config dtype on CUDA, float32 on CPU
    device: str | None = None  # None: the registry's device
    is_quant_model: bool = False
    quantization: str = ""  # "" / "int8" / "int4" / "fp8": quantize a dense checkpoint while loading
    attention_backend: str = "auto"
    kv_cache: KvCacheOptions = field(default_factory=KvCacheOptions)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    # CPU: single-sequence decode steps of forward_with_cache run torch.compile'd code, compiled at
    # Load (architectures/compiled_decode.py).
    compile_decode: bool = False
    # "mmap": CPU parameters whose bytes are the checkpoint's are views of the mapped file (see
    # registry.safetensors_loader.load_checkpoint); "copy": every parameter owns its memory.
    load_mode: str = "mmap"
    # The matmul kernel of dense float32 CPU layers: auto / torch / onednn (registry/cpu_gemm.py);
    # the registry resolves auto before the Load, so a loaded model's spec names the kernel it runs.
    cpu_gemm: str = "auto"


@dataclass(frozen=True)
class CacheSpec:
    """What a loaded model's caches hold; reported to the scheduler in ModelInfo."""

    block_size: int
    num_blocks: int
    max_seq_len: int
    max_batch_size: int
    paged_bytes: int
    contiguous_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.paged_bytes + self.contiguous_bytes


@dataclass(frozen=True)
class KvLayout:
    """What one paged KV block holds, for every layer: K and V of `block_size` tokens ×
    `num_kv_heads` × `head_dim` in `dtype`. Blocks move between caches of equal layouts only.
    A tensor-parallel model reports the full (all ranks') head count: transfers carry whole heads."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one layer of one block, K and V together."""
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over every layer, K and V together."""
        return self.num_layers * self.layer_block_bytes

    def differences(self, other: KvLayout) -> list[str]:
        """`name ours vs theirs` for each field that differs (empty when compatible)."""
        return [
            f"{name} {getattr(self, name)} vs {getattr(other, name)}"
            for name in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
            if getattr(self, name) != getattr(other, name)
        ]


class Model(abc.ABC):
    """A loaded model (the seed's Model trait). Not thread-safe: callers hold the registry's
    exclusive access (`get_model_mut`) for every call that touches a cache.

    Logits are float32 unless `logits_dtype` asks otherwise. Every method validates its arguments
    before any tensor work and raises a `registry.errors` type; a rejected call changes no cache.
    """

    config: ModelConfig

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abc.abstractmethod
    def num_parameters(self) -> int: ...

    @property
    @abc.abstractmethod
    def weight_bytes(self) -> int: ...

    @property
    @abc.abstractmethod
    def cache_spec(self) -> CacheSpec: ...

    @property
    @abc.abstractmethod
    def attention_backend(self) -> str: ...

    @property
    def load_mode(self) -> str:
        """ "mmap" when some weights are views of the memory-mapped checkpoint, else "copy"."""
        return "copy"

    @property
    def cpu_gemm(self) -> str:
        """The matmul kernel of the dense linear layers ("torch" or "onednn", registry/cpu_gemm.py)."""
        return "torch"

    @property
    def compile_seconds(self) -> float:
        """Seconds the Load spent compiling decode steps (LoadOptions.compile_decode); 0 when not."""
        return 0.0

    @property
    def mapped_weight_bytes(self) -> int:
        """The part of weight_bytes held as file-backed pages (page cache, shared); the rest is the
        process's own memory."""
        return 0

    @property
    def cuda_graph_batch_sizes(self) -> list[int]:
        """Decode batch sizes replayed from CUDA graphs (empty: every call runs eagerly)."""
        return []

    @property
    def cuda_graph_bytes(self) -> int:
        """Device memory held by the captured graphs."""
        return 0

    @property
    def quantization(self) -> str:
        """How the weights are held, e.g. "gptq-int4-g128", "int8"; "" for dense."""
        return ""

    @abc.abstractmethod
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *, all_logits: bool = True
    ) -> torch.Tensor:
        """Stateless causal forward. input_ids/positions [batch, seq] → logits [batch, seq, vocab]
        (or [batch, vocab] for the last position when all_logits=False)."""

    @abc.abstractmethod
    def forward_with_cache(
        self,
        input_ids: torch.Tensor,
        start_pos: int,
        seq_len: int,
        positions: torch.Tensor | None = None,
        *,
        all_logits: bool = True,
    ) -> torch.Tensor:
        """input_ids [batch, seq_len] written to contiguous cache rows [0, batch) at
        [start_pos, start_pos + seq_len); attends over [0, start_pos + seq_len)."""

    @abc.abstractmethod
    def forward_paged(
        self,
        input_tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: Sequence[Sequence[int]],
        slot_mapping: torch.Tensor,
        context_lens: Sequence[int],
        is_prefill: bool,
        query_lens: Sequence[int] | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Tokens of all sequences concatenated ([num_tokens]) → logits [num_seqs, vocab]
        (last query token of each sequence), or [num_tokens, vocab] when all_logits. Speculative
        verification passes `logits_indices=` (rows of the tokens to score) when the model takes it
        (the built-in architectures do)."""

    @abc.abstractmethod
    def reset_kv_cache(self) -> None: ...

    @abc.abstractmethod
    def slice_kv_cache(
        self, layer_idx: int, start_pos: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the contiguous cache: [max_batch_size, num_kv_heads, length, head_dim]."""

    # -- KV block transfer (disaggregated prefill, swapping); a model without a paged cache keeps these.
    @property
    def kv_layout(self) -> KvLayout | None:
        """The paged cache's layout, or None when the model has no paged cache to transfer."""
        return None

    def export_kv_blocks(
        self, block_ids: Sequence[int], layer_start: int = 0, layer_end: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A host (CPU) copy of K and V of `block_ids` (distinct, in range) for layers [layer_start,
        layer_end): each [layers, blocks, block_size, num_kv_heads, head_dim] in the cache dtype."""
        from .errors import FailedPrecondition

        raise FailedPrecondition(f"{type(self).__name__} has no paged KV cache to export")

    def import_kv_blocks(self, dst_block_ids: Sequence[int], key: torch.Tensor, value: torch.Tensor) -> None:
        """Write K and V of every layer ([num_layers, blocks, block_size, num_kv_heads, head_dim]) into
        the distinct blocks `dst_block_ids`; everything is checked first, so a refused call writes nothing."""
        from .errors import FailedPrecondition

        raise FailedPrecondition(f"{type(self).__name__} has no paged KV cache to import into")

    @abc.abstractmethod
    def release(self) -> int:
        """Drop weights and caches (the model is unusable afterwards); returns the bytes freed."""


# A builder assembles a Model from a directory of safetensors weights.
ModelBuilder = Callable[[Path, torch.device, LoadOptions], Model]
