"""Qwen3: the Llama network with RMSNorm over head_dim on q and k (q_norm, k_norm) before RoPE, and
an explicit head_dim (not hidden_size / heads)."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import LoadOptions, LoadPlan, ModelConfig

from .base import CausalLM, build_causal_lm
from .llama import DecoderVariant, LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return DecoderVariant(qk_norm=True)


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for Qwen3ForCausalLM."""
    return build_causal_lm(model_dir, device, options, Qwen3ForCausalLM, plan)
