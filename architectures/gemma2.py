"""Gemma 2: the Llama network with (1 + w) norms in float32, four norms per layer (sandwich),
embeddings × sqrt(hidden_size), gelu-tanh (`hidden_activation`), attention logit softcapping (in
every attention path and backend) and a final logit softcap, a softmax scale of
query_pre_attn_scalar ** -0.5, and sliding-window attention on every other layer (from
`layer_types`, or layers 0, 2, 4, ... in 4.x configs without it)."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import LoadOptions, LoadPlan, ModelConfig

from .base import CausalLM, build_causal_lm
from .llama import DecoderVariant, LlamaForCausalLM


def pattern_windows(config: ModelConfig, period: int) -> tuple[int | None, ...] | None:
    """Windows of a config without `layer_types`: every layer windowed except each period-th
    (Gemma 2: period 2, Gemma 3: `sliding_window_pattern`, 6). None: the config's own list."""
    if config.raw.get("layer_types") is not None or config.raw.get("sliding_window") is None:
        return None
    window = config.get_int("sliding_window", minimum=1)
    return tuple(window if (i + 1) % period else None for i in range(config.num_hidden_layers))


def gemma_variant(config: ModelConfig, period: int, **flags) -> DecoderVariant:
    return DecoderVariant(
        norm_offset=1.0,
        sandwich_norms=True,
        embedding_scale=True,
        final_logit_softcap=config.get_optional_float("final_logit_softcapping"),
        attn_logit_softcap=config.get_optional_float("attn_logit_softcapping"),
        query_pre_attn_scalar=config.get_float("query_pre_attn_scalar", config.head_dim, positive=True),
        layer_windows=pattern_windows(config, period),
        **flags,
    )


class Gemma2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return gemma_variant(config, period=2)


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for Gemma2ForCausalLM."""
    return build_causal_lm(model_dir, device, options, Gemma2ForCausalLM, plan)
