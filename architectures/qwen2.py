"""Qwen2: the Llama network with q/k/v biases (and an optional sliding window from
`max_window_layers` on, which ModelConfig turns into per-layer windows)."""

from __future__ import annotations

from pathlib import Path

import torch

from registry import LoadOptions

from .base import CausalLM, build_causal_lm
from .llama import LlamaForCausalLM


def build(model_dir: Path, device: torch.device, options: LoadOptions) -> CausalLM:
    """Builder for Qwen2ForCausalLM."""
    return build_causal_lm(
        model_dir,
        device,
        options,
        lambda cfg: LlamaForCausalLM(cfg, qkv_bias=True),
        LlamaForCausalLM.weight_mapping,
    )
