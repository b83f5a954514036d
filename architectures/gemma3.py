"""Gemma 3 (text): Gemma 2's network (gemma2.py) plus (1 + w) q/k norms, five windowed layers to one
global (`layer_types`, or `sliding_window_pattern` in 4.x configs), and two RoPE bases: the global
layers use the model's rope (rope_theta and its scaling), the windowed ones their own base
(`rope_local_base_freq` in 4.x, `rope_parameters.sliding_attention.rope_theta` in 5.x), unscaled.
Softcaps are read as in Gemma 2 (the released checkpoints set none)."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import InvalidConfig, LoadOptions, LoadPlan, ModelConfig

from .base import CausalLM, build_causal_lm
from .gemma2 import gemma_variant
from .llama import DecoderVariant, LlamaForCausalLM


def local_rope_theta(config: ModelConfig) -> float:
    params = config.raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
        local = params["sliding_attention"]
        if local.get("rope_type", "default") != "default":
            raise InvalidConfig(
                "config.json: rope_parameters.sliding_attention supports rope_type default only"
            )
        theta = local.get("rope_theta", 10000.0)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise InvalidConfig(
                f"config.json: rope_parameters.sliding_attention.rope_theta must be a positive number, got {theta!r}"
            )
        return float(theta)
    return config.get_float("rope_local_base_freq", 10000.0, positive=True)


class Gemma3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        if config.get_bool("use_bidirectional_attention", False):  # embedding checkpoints, not causal LMs
            raise InvalidConfig(
                "config.json: use_bidirectional_attention true is not supported (causal only)"
            )
        period = config.get_int(
            "sliding_window_pattern", config.raw.get("_sliding_window_pattern", 6), minimum=1
        )
        return gemma_variant(config, period, qk_norm=True, local_rope_theta=local_rope_theta(config))


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for Gemma3ForCausalLM (text only)."""
    return build_causal_lm(model_dir, device, options, Gemma3ForCausalLM, plan)
