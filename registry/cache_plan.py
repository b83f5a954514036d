"""KV cache sizing shared by the builders (which allocate) and the worker's admission check (which
must predict the same bytes before anything is allocated)."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import InvalidArgument, OutOfResources
from .model import CacheSpec, KvCacheOptions

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_BATCH_SIZE = 1
DEFAULT_MAX_SEQ_LEN = 2048
# Paged budget when the Load names neither num_blocks nor max_bytes.
DEFAULT_CPU_KV_BYTES = 256 * 1024 * 1024
DEFAULT_CUDA_KV_FRACTION = 0.8  # of the device memory still free after the weights are loaded
MAX_CACHE_TOKENS_PER_ROW = 1 << 20


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token across all layers."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def plan_cache(
    config: ModelConfig,
    options: KvCacheOptions,
    dtype: torch.dtype,
    device: torch.device,
    free_bytes_after_weights: int | None = None,
) -> CacheSpec:
    """Block size, block count, contiguous rows/length and their bytes for a Load's options."""
    per_token = kv_bytes_per_token(config, dtype)
    for name in ("block_size", "num_blocks", "max_bytes", "max_seq_len", "max_batch_size"):
        # 0 means "default"; a negative count would otherwise size a cache with negative bytes.
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidArgument(
                f"kv_cache.{name} must be a non-negative integer (0: default), got {value!r}"
            )
    block_size = options.block_size or DEFAULT_BLOCK_SIZE
    if block_size <= 0 or block_size > 65536:
        raise InvalidArgument(f"kv_cache.block_size must be in [1, 65536], got {block_size}")
    max_seq_len = options.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, config.position_limit)
    if max_seq_len > config.position_limit:
        raise InvalidArgument(
            f"kv_cache.max_seq_len {max_seq_len} exceeds the model's {config.position_limit} positions"
        )
    max_batch = options.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    if max_batch * max_seq_len > MAX_CACHE_TOKENS_PER_ROW * 16:
        raise InvalidArgument(
            f"kv_cache.max_batch_size × max_seq_len = {max_batch * max_seq_len} tokens is too large"
        )
    if options.num_blocks:
        num_blocks = options.num_blocks
    else:
        budget = options.max_bytes
        if not budget:
            if device.type == "cuda" and free_bytes_after_weights is not None:
                budget = int(free_bytes_after_weights * DEFAULT_CUDA_KV_FRACTION)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        num_blocks = budget // (per_token * block_size)
        if num_blocks < 1:
            raise OutOfResources(
                f"kv_cache budget of {budget} bytes holds no block of {block_size} tokens "
                f"({per_token * block_size} bytes per block)"
            )
    return CacheSpec(
        block_size=block_size,
        num_blocks=num_blocks,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch,
        paged_bytes=num_blocks * block_size * per_token,
        contiguous_bytes=max_batch * max_seq_len * per_token,
    )
