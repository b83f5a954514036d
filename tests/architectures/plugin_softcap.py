"""A third-party architecture in one file, as README's "Adding an architecture" describes: Llama with
a final logit softcap read from its own config field, registered through the entry-point group
`modelworker.architectures` (tests/architectures/test_plugin.py installs the entry point)."""

from __future__ import annotations

from pathlib import Path

import torch

from architectures.base import CausalLM, build_causal_lm
from architectures.llama import DecoderVariant, LlamaForCausalLM
from registry import LoadOptions, LoadPlan, ModelConfig, ModelRegistry

ARCHITECTURE = "SoftcapLlamaForCausalLM"


class SoftcapLlamaForCausalLM(LlamaForCausalLM):
    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return DecoderVariant(final_logit_softcap=config.get_float("final_logit_softcapping", positive=True))


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    return build_causal_lm(model_dir, device, options, SoftcapLlamaForCausalLM, plan)


def register(registry: ModelRegistry) -> None:
    registry.register_architecture(ARCHITECTURE, build)
