"""Qwen2-MoE: the Qwen2 network (q/k/v biases) whose MLP is the shared sparse block
(architectures/moe.py) on the layers `decoder_sparse_step` and `mlp_only_layers` select, plus a
shared expert gated per token by sigmoid(shared_expert_gate(x)). The top-k routing weights are
renormalised only when `norm_topk_prob` is set. Qwen3-MoE (qwen3_moe.py) reuses the spec reader."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import ExpertPart, InvalidConfig, LoadOptions, LoadPlan, ModelConfig, WeightMapping

from .base import CausalLM, build_causal_lm
from .llama import LLAMA_WEIGHT_MAPPING, DecoderVariant, LlamaForCausalLM
from .moe import MoeSpec

# Checkpoint `mlp.experts.<E>.{gate,up,down}_proj` fill expert E of the stacked parameters.
QWEN_MOE_WEIGHT_MAPPING = WeightMapping(
    fused=LLAMA_WEIGHT_MAPPING.fused,
    experts=(
        ExpertPart("experts", "gate_proj", "gate_up_proj", 0),
        ExpertPart("experts", "up_proj", "gate_up_proj", 1),
        ExpertPart("experts", "down_proj", "down_proj"),
    ),
    ignore=LLAMA_WEIGHT_MAPPING.ignore,
)


def qwen_moe_spec(config: ModelConfig, *, shared_expert: bool) -> MoeSpec:
    # 4.x writes num_experts; 5.x Qwen3-MoE writes num_local_experts.
    key = "num_experts" if config.raw.get("num_experts") is not None else "num_local_experts"
    experts = config.get_int(key, minimum=1)
    top_k = config.get_int("num_experts_per_tok", minimum=1)
    if top_k > experts:
        raise InvalidConfig(
            f"config.json: num_experts_per_tok ({top_k}) exceeds the number of experts ({experts})"
        )
    step = config.get_int("decoder_sparse_step", 1, minimum=1)
    dense = set(config.get_int_list("mlp_only_layers", []))
    sparse = frozenset(i for i in range(config.num_hidden_layers) if i not in dense and (i + 1) % step == 0)
    return MoeSpec(
        num_experts=experts,
        top_k=top_k,
        intermediate_size=config.get_int("moe_intermediate_size", minimum=1),
        norm_topk_prob=config.get_bool("norm_topk_prob", False),
        sparse_layers=sparse,
        shared_expert_intermediate_size=(
            config.get_int("shared_expert_intermediate_size", minimum=0) if shared_expert else 0
        ),
    )


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    weight_mapping = QWEN_MOE_WEIGHT_MAPPING

    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return DecoderVariant(qkv_bias=True, moe=qwen_moe_spec(config, shared_expert=True))


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for Qwen2MoeForCausalLM."""
    return build_causal_lm(model_dir, device, options, Qwen2MoeForCausalLM, plan)
