"""plan_cache: KV sizing from the Load's options, checked against sizes computed here by hand."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
import torch

from registry import InvalidArgument, KvCacheOptions, ModelConfig, OutOfResources
from registry.cache_plan import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CPU_KV_BYTES,
    DEFAULT_CUDA_KV_FRACTION,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_SEQ_LEN,
    kv_bytes_per_token,
    plan_cache,
)

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


def config(**overrides: Any) -> ModelConfig:
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    }
    cfg.update(overrides)
    return ModelConfig.from_hf(cfg)


def per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * layers * kv_heads * head_dim * itemsize  # K and V


def test_bytes_per_token() -> None:
    cfg = config()
    assert kv_bytes_per_token(cfg, torch.float32) == per_token(3, 2, 8, 4) == 384
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 192
    assert kv_bytes_per_token(config(head_dim=32), torch.float16) == per_token(3, 2, 32, 2)


def test_num_blocks_from_options() -> None:
    rng = random.Random(5)
    for _ in range(20):
        layers, kv, dtype = (
            rng.randint(1, 6),
            rng.choice([1, 2, 4]),
            rng.choice([torch.float32, torch.bfloat16]),
        )
        cfg = config(num_hidden_layers=layers, num_key_value_heads=kv)
        opts = KvCacheOptions(
            block_size=rng.choice([1, 16, 256]),
            num_blocks=rng.randint(1, 500),
            max_seq_len=rng.randint(1, 4096),
            max_batch_size=rng.randint(1, 8),
        )
        spec = plan_cache(cfg, opts, dtype, CPU)
        tok = per_token(layers, kv, 8, dtype.itemsize)
        assert (spec.block_size, spec.num_blocks) == (opts.block_size, opts.num_blocks)
        assert (spec.max_seq_len, spec.max_batch_size) == (opts.max_seq_len, opts.max_batch_size)
        assert spec.paged_bytes == opts.num_blocks * opts.block_size * tok
        assert spec.contiguous_bytes == opts.max_batch_size * opts.max_seq_len * tok
        assert spec.total_bytes == spec.paged_bytes + spec.contiguous_bytes


def test_num_blocks_from_max_bytes() -> None:
    cfg = config()
    block = 16 * 384  # bytes of one f32 block
    for budget in (block, block + 1, 10 * block - 1, 12345678):
        spec = plan_cache(cfg, KvCacheOptions(max_bytes=budget), torch.float32, CPU)
        assert spec.num_blocks == budget // block
        assert spec.paged_bytes <= budget < spec.paged_bytes + block
    # num_blocks wins over max_bytes when both are given.
    assert plan_cache(cfg, KvCacheOptions(num_blocks=3, max_bytes=10**9), torch.float32, CPU).num_blocks == 3


def test_defaults() -> None:
    cfg = config(max_position_embeddings=100_000)
    spec = plan_cache(cfg, KvCacheOptions(), torch.float32, CPU)
    assert spec.block_size == DEFAULT_BLOCK_SIZE
    assert spec.max_seq_len == DEFAULT_MAX_SEQ_LEN
    assert spec.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert spec.num_blocks == DEFAULT_CPU_KV_BYTES // (DEFAULT_BLOCK_SIZE * 384)
    # The default length never exceeds what the model can address.
    assert (
        plan_cache(config(max_position_embeddings=64), KvCacheOptions(), torch.float32, CPU).max_seq_len == 64
    )


def test_cuda_default_budget_is_a_fraction_of_free_memory() -> None:
    cfg = config()
    free = 3 * 1024**3 + 17
    spec = plan_cache(cfg, KvCacheOptions(), torch.bfloat16, CUDA, free_bytes_after_weights=free)
    assert spec.num_blocks == int(free * DEFAULT_CUDA_KV_FRACTION) // (DEFAULT_BLOCK_SIZE * 192)
    # Unknown free memory falls back to the fixed budget.
    spec = plan_cache(cfg, KvCacheOptions(), torch.bfloat16, CUDA)
    assert spec.num_blocks == DEFAULT_CPU_KV_BYTES // (DEFAULT_BLOCK_SIZE * 192)
    # On CPU the free-memory figure is not used.
    spec = plan_cache(cfg, KvCacheOptions(), torch.bfloat16, CPU, free_bytes_after_weights=1)
    assert spec.num_blocks == DEFAULT_CPU_KV_BYTES // (DEFAULT_BLOCK_SIZE * 192)


def test_dynamic_rope_extends_the_addressable_length() -> None:
    cfg = config(max_position_embeddings=1024, rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    assert plan_cache(cfg, KvCacheOptions(max_seq_len=4096), torch.float32, CPU).max_seq_len == 4096
    with pytest.raises(InvalidArgument, match="4097"):
        plan_cache(cfg, KvCacheOptions(max_seq_len=4097), torch.float32, CPU)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (KvCacheOptions(block_size=65537), "block_size"),
        (KvCacheOptions(block_size=-16), "block_size"),
        (KvCacheOptions(num_blocks=-1), "num_blocks"),
        (KvCacheOptions(max_bytes=-1), "max_bytes"),
        (KvCacheOptions(max_seq_len=-5), "max_seq_len"),
        (KvCacheOptions(max_batch_size=-2), "max_batch_size"),
        (KvCacheOptions(max_seq_len=4097), "max_seq_len 4097"),
        (KvCacheOptions(max_seq_len=4096, max_batch_size=1 << 20), "max_batch_size"),
        (KvCacheOptions(num_blocks=2.5), "num_blocks"),  # type: ignore[arg-type]
    ],
)
def test_invalid_options(options: KvCacheOptions, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        plan_cache(config(), options, torch.float32, CPU)


def test_budget_below_one_block() -> None:
    cfg = config()
    with pytest.raises(OutOfResources, match="holds no block"):
        plan_cache(cfg, KvCacheOptions(max_bytes=16 * 384 - 1), torch.float32, CPU)
    with pytest.raises(OutOfResources):
        plan_cache(cfg, KvCacheOptions(), torch.float32, CUDA, free_bytes_after_weights=0)
    # The same budget holds a block once the cache dtype halves the bytes.
    assert plan_cache(cfg, KvCacheOptions(max_bytes=16 * 384 - 1), torch.bfloat16, CPU).num_blocks == 1


def test_block_size_bounds() -> None:
    cfg = config()
    assert (
        plan_cache(cfg, KvCacheOptions(block_size=65536, num_blocks=1), torch.float32, CPU).block_size
        == 65536
    )
    assert (
        plan_cache(cfg, replace(KvCacheOptions(), block_size=1, num_blocks=1), torch.float32, CPU).block_size
        == 1
    )
