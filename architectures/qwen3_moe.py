"""Qwen3-MoE: the Qwen3 network (q/k norms) whose MLP is the shared sparse block on the layers
`decoder_sparse_step` and `mlp_only_layers` select; no shared expert; `norm_topk_prob` as set."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import LoadOptions, LoadPlan, ModelConfig

from .base import CausalLM, build_causal_lm
from .llama import DecoderVariant, LlamaForCausalLM
from .qwen2_moe import QWEN_MOE_WEIGHT_MAPPING, qwen_moe_spec


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    weight_mapping = QWEN_MOE_WEIGHT_MAPPING

    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return DecoderVariant(qk_norm=True, moe=qwen_moe_spec(config, shared_expert=False))


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for Qwen3MoeForCausalLM."""
    return build_causal_lm(model_dir, device, options, Qwen3MoeForCausalLM, plan)
