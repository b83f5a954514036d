"""Qwen2: the Llama network with q/k/v biases (and an optional sliding window from
`max_window_layers` on, which ModelConfig turns into per-layer windows)."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import LoadOptions, LoadPlan, ModelConfig

from .base import CausalLM, build_causal_lm
from .llama import DecoderVariant, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return DecoderVariant(qkv_bias=True)


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for Qwen2ForCausalLM."""
    return build_causal_lm(model_dir, device, options, Qwen2ForCausalLM, plan)
