"""Tiny random Hugging Face checkpoints written by the tests themselves (transformers is the
reference implementation, a test-only dependency)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_BASE: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)


def hf_config(arch: str = "llama", **overrides: Any):
    """A transformers config object for a tiny model of `arch` (llama, mistral, qwen2)."""
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[arch]
    kwargs = dict(TINY_BASE)
    kwargs.update(overrides)
    return cls(**kwargs)


def make_hf_model(arch: str = "llama", seed: int = 0, **overrides: Any):
    """A random-weight transformers model in float32 eval mode."""
    import transformers

    config = hf_config(arch, **overrides)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[arch]
    torch.manual_seed(seed)
    model = cls(config).eval()
    # Random init leaves some tensors (norms) at exactly 1; perturb so every weight matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save_hf_model(model, out_dir: Path, max_shard_size: str | None = None) -> Path:
    """Save with safetensors (sharded when max_shard_size is given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    return out_dir


def make_tiny_model_dir(out_dir: Path, arch: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random model of `arch` to out_dir and return out_dir."""
    return save_hf_model(make_hf_model(arch, seed=seed, **overrides), out_dir)


def read_config(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())
