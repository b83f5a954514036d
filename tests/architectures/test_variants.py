"""DecoderVariant flags on the shared Llama layers, each against the transformers model that has
that feature (fp32, max |Δ| ≤ 1e-4): q/k norm (Qwen3), and (1 + w) norms, sandwich norms,
embedding scaling and the final logit softcap (Gemma 2 with attention softcapping off)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from architectures.base import build_causal_lm
from architectures.llama import DecoderVariant, LlamaForCausalLM
from registry import LoadOptions, ModelConfig
from tests.tiny_models import TINY_BASE, save_hf_model

transformers = pytest.importorskip("transformers")


class QkNormLlama(LlamaForCausalLM):
    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return DecoderVariant(qk_norm=True)


class SandwichLlama(LlamaForCausalLM):
    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        return DecoderVariant(
            norm_offset=1.0,
            sandwich_norms=True,
            embedding_scale=True,
            final_logit_softcap=config.get_optional_float("final_logit_softcapping"),
        )


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # norms start at 0 (Gemma) or 1: make every weight matter
    return model.eval()


def compare(ref: torch.nn.Module, network: type[LlamaForCausalLM], model_dir: Path, seed: int) -> float:
    ours = build_causal_lm(model_dir, torch.device("cpu"), LoadOptions(), network)
    ids = torch.randint(0, TINY_BASE["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ref(ids).logits
    return float((ours.forward(ids) - want).abs().max())


def test_qk_norm_matches_qwen3(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**{**TINY_BASE, "head_dim": 24, "tie_word_embeddings": False})
    ref = perturbed(transformers.Qwen3ForCausalLM(config), seed=1)
    model_dir = save_hf_model(ref, tmp_path / "q")
    assert compare(ref, QkNormLlama, model_dir, seed=2) <= 1e-4


def test_gemma_norms_sandwich_embedding_scale_and_final_softcap_match_gemma2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head_dim = 16
    config = transformers.Gemma2Config(
        **TINY_BASE,
        head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=head_dim,  # our scale is head_dim ** -0.5
        attn_logit_softcapping=None,  # this test isolates the other flags (gemma2.py has the softcap)
        final_logit_softcapping=2.0,
        sliding_window=64,  # longer than the test's sequences
    )
    ref = perturbed(transformers.Gemma2ForCausalLM(config), seed=3)
    model_dir = save_hf_model(ref, tmp_path / "g")
    raw = json.loads((model_dir / "config.json").read_text())
    raw["hidden_act"] = raw["hidden_activation"]  # Gemma 2 names its activation differently
    (model_dir / "config.json").write_text(json.dumps(raw))
    assert compare(ref, SandwichLlama, model_dir, seed=4) <= 1e-4
