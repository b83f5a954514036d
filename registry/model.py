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
        (last query token of each sequence), or [num_tokens, vocab] when all_logits."""

    @abc.abstractmethod
    def reset_kv_cache(self) -> None: ...

    @abc.abstractmethod
    def slice_kv_cache(
        self, layer_idx: int, start_pos: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the contiguous cache: [max_batch_size, num_kv_heads, length, head_dim]."""

    @abc.abstractmethod
    def release(self) -> int:
        """Drop weights and caches (the model is unusable afterwards); returns the bytes freed."""


# A builder assembles a Model from a directory of safetensors weights.
ModelBuilder = Callable[[Path, torch.device, LoadOptions], Model]
