"""Layers rewritten for fewer ops per call compute what the ops they replace compute, to the bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from architectures.layers import RMSNorm, RotaryEmbedding, apply_rotary
from registry import ModelConfig


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 7, 64), (5, 48)])
def test_rms_norm_equals_f_rms_norm(shape: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    norm = RMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = torch.randn(shape[-1], generator=gen)
    x = torch.randn(shape, generator=gen) * 3
    assert torch.equal(norm(x), F.rms_norm(x, norm.weight.shape, norm.weight, norm.eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rotary_equals_the_reference_formula(partial: float, seed: int) -> None:
    """The sin table with rotate_half's sign folded in and one roll give x * cos + rotate_half(x) *
    sin of the reference, bit for bit (partial rotary turns the first dims only)."""
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 32,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "partial_rotary_factor": partial,
    }
    config = ModelConfig.from_hf(raw, "LlamaForCausalLM")
    rotary = RotaryEmbedding(config, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 256, (2, 5), generator=gen)
    cos, sin = rotary(positions)
    d = cos.shape[-1]
    assert d == int(16 * partial)
    freqs = positions.float().unsqueeze(-1) * rotary._freqs[0]
    emb = torch.cat((freqs, freqs), dim=-1)
    ref_cos, ref_sin = emb.cos().unsqueeze(-2), emb.sin().unsqueeze(-2)
    x = torch.randn(2, 5, 4, 16, generator=gen)
    rot = x[..., :d]
    want = torch.cat((rot * ref_cos + _rotate_half(rot) * ref_sin, x[..., d:]), dim=-1)
    assert torch.equal(apply_rotary(x, cos, sin), want)


def test_decode_attention_folds_gqa_whatever_the_kernels_output_strides(monkeypatch, seed: int) -> None:
    """One query over a contiguous cache: the G query heads of a KV head attend as its G queries.
    CUDA's memory-efficient kernel returns [B, Hkv, G, D] with non-contiguous strides; an output
    like that is reshaped, not viewed (a view raised)."""
    from architectures import kv_cache

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, 9, 16, generator=gen).transpose(1, 2)  # [B, H, 1, D] as the layer gives it
    k, v = (torch.randn(2, 3, 20, 16, generator=gen) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(kv_cache.dense_attention(q, k, v, 19, None, 0.25), want, rtol=0, atol=1e-6)
    plain = kv_cache.attention

    def strided(*args, **kwargs):  # [B, Hkv, G, D] with the strides of [B, G, Hkv, D]
        return plain(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(kv_cache, "attention", strided)
    torch.testing.assert_close(kv_cache.dense_attention(q, k, v, 19, None, 0.25), want, rtol=0, atol=1e-6)
