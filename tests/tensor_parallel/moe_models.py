"""Tiny mixture-of-experts checkpoints written by transformers in the three layouts we shard:
Mixtral (`block_sparse_moe`, experts w1/w3/w2), Qwen2-MoE (a gated shared expert) and Qwen3-MoE
(a dense layer among the sparse ones). `stack_experts` rewrites a checkpoint with the experts
stacked ([E, 2I, H] gate_up_proj, [E, H, I] down_proj), as newer exports store them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
MOE_LAYOUTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            head_dim=8,
        ),
    ),
}


def make_moe_model_dir(out_dir: Path, layout: str, seed: int = 0, **overrides: Any) -> Path:
    import transformers

    config_cls, model_cls, extra = MOE_LAYOUTS[layout]
    config = getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # routers start near uniform, norms at 1: make every weight matter
            p.add_(torch.randn_like(p) * 0.1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")
# Per-expert part → (stacked parameter, position among the fused parts).
PARTS = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0)}
PARTS |= {"w1": PARTS["gate_proj"], "w3": PARTS["up_proj"], "w2": PARTS["down_proj"]}


def stack_experts(model_dir: Path) -> None:
    """Rewrite model.safetensors with each layer's experts stacked."""
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for name, t in tensors.items():
        match = EXPERT.match(name)
        if match is None:
            out[name] = t
            continue
        prefix, expert, part = match.group(1), int(match.group(2)), match.group(3)
        stacked, position = PARTS[part]
        stacks.setdefault(f"{prefix}.{stacked}", {})[(expert, position)] = t
    for name, parts in stacks.items():
        experts = sorted({e for e, _ in parts})
        out[name] = torch.stack(
            [torch.cat([parts[(e, p)] for p in sorted(q for x, q in parts if x == e)]) for e in experts]
        ).contiguous()
    path.unlink()
    save_file(out, path)
