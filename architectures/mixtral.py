"""Mixtral: the Mistral network whose every MLP is the shared sparse block (architectures/moe.py),
named `block_sparse_moe` in the checkpoint, experts `w1` (gate), `w3` (up), `w2` (down); the
top-k routing weights are always renormalised."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import ExpertPart, InvalidConfig, LoadOptions, LoadPlan, ModelConfig, WeightMapping

from .base import CausalLM, build_causal_lm
from .llama import LLAMA_WEIGHT_MAPPING, DecoderVariant, LlamaForCausalLM
from .moe import MoeSpec

MIXTRAL_WEIGHT_MAPPING = WeightMapping(
    fused=LLAMA_WEIGHT_MAPPING.fused,
    experts=(
        ExpertPart("experts", "w1", "gate_up_proj", 0),
        ExpertPart("experts", "w3", "gate_up_proj", 1),
        ExpertPart("experts", "w2", "down_proj"),
    ),
    ignore=LLAMA_WEIGHT_MAPPING.ignore,
)


class MixtralForCausalLM(LlamaForCausalLM):
    weight_mapping = MIXTRAL_WEIGHT_MAPPING

    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        experts = config.get_int("num_local_experts", minimum=1)
        top_k = config.get_int("num_experts_per_tok", minimum=1)
        if top_k > experts:
            raise InvalidConfig(
                f"config.json: num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})"
            )
        spec = MoeSpec(
            num_experts=experts,
            top_k=top_k,
            intermediate_size=config.intermediate_size,
            norm_topk_prob=True,
            sparse_layers=frozenset(range(config.num_hidden_layers)),
            module_name="block_sparse_moe",
            intermediate_field="intermediate_size",
        )
        return DecoderVariant(moe=spec)


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for MixtralForCausalLM."""
    return build_causal_lm(model_dir, device, options, MixtralForCausalLM, plan)
