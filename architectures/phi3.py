"""Phi-3: the Llama network loaded from a checkpoint that already fuses `qkv_proj` and
`gate_up_proj` (each fills every shard of our fused parameters at once), with LongRoPE (`longrope`,
4.x `su`: short/long factors chosen per call from its longest position) and partial rotary
(`partial_rotary_factor`), both handled by the shared rotary embedding."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import LoadOptions, LoadPlan

from .base import CausalLM, build_causal_lm
from .llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    pass


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for Phi3ForCausalLM."""
    return build_causal_lm(model_dir, device, options, Phi3ForCausalLM, plan)
