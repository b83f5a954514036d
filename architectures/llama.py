"""Llama 2/3/3.1 and Mistral (Llama with a sliding window), read top to bottom:
Attention → MLP → DecoderLayer → Model → ForCausalLM, then the builder.

Variants are flags on these shared layers (`DecoderVariant`): Qwen2 is this network with q/k/v
biases (qwen2.py); Qwen3, Gemma and the like set other flags in their own files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from registry import FusedPart, LoadOptions, LoadPlan, ModelConfig, WeightMapping

from .attention import AttentionContext
from .base import CausalLM, build_causal_lm
from .layers import FusedLinear, GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary

# Checkpoint q/k/v and gate/up are row shards of our fused projections.
LLAMA_WEIGHT_MAPPING = WeightMapping(
    fused=(
        FusedPart("q_proj", "qkv_proj", 0),
        FusedPart("k_proj", "qkv_proj", 1),
        FusedPart("v_proj", "qkv_proj", 2),
        FusedPart("gate_proj", "gate_up_proj", 0),
        FusedPart("up_proj", "gate_up_proj", 1),
    ),
    ignore=(r"rotary_emb\.inv_freq$", r"\.rotary_emb\."),
)


@dataclass(frozen=True)
class DecoderVariant:
    """How a Llama-family network departs from Llama: each flag switches one small piece of the
    shared layers below, so a variant is a few lines (a `variant_for` override), never a copied file.

    Attention logit softcapping (Gemma 2) needs the attention contexts and backends to apply it and
    is not a flag yet.
    """

    qkv_bias: bool = False  # Qwen2: biases on q/k/v (config.attention_bias adds one on o_proj too)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of q and k before RoPE (q_norm, k_norm)
    norm_offset: float = 0.0  # Gemma: norms scale by (offset + weight), computed in float32
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP too (four per layer)
    embedding_scale: bool = False  # Gemma: embeddings × sqrt(hidden_size)
    final_logit_softcap: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, variant: DecoderVariant) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(
            config.hidden_size,
            (self.q_size, self.kv_size, self.kv_size),
            bias=variant.qkv_bias or config.attention_bias,
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        if variant.qk_norm:  # over head_dim, shared by every head
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, variant.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, variant.norm_offset)
        self.qk_norm = variant.qk_norm
        self.window = config.layer_sliding_windows[layer_idx]
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        lead = x.shape[:-1]  # [batch, seq] (dense) or [num_tokens] (paged)
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        out = ctx.attend(self.layer_idx, q, k, v, self.window, self.scale)
        return self.o_proj(out.reshape(*lead, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, variant: DecoderVariant) -> None:
        super().__init__()
        hidden, eps, offset = config.hidden_size, config.rms_norm_eps, variant.norm_offset
        self.input_layernorm = RMSNorm(hidden, eps, offset)
        self.self_attn = LlamaAttention(config, layer_idx, variant)
        # Llama: post_attention_layernorm is the MLP's input norm. Sandwich (Gemma 2/3, checkpoint
        # names): it normalizes the attention output, and the MLP gets pre/post_feedforward norms.
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset)
        if variant.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset)
        self.sandwich = variant.sandwich_norms
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, ctx))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, variant: DecoderVariant) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, variant) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, variant.norm_offset)
        self.embedding_scale = config.hidden_size**0.5 if variant.embedding_scale else None

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, ctx: AttentionContext
    ) -> torch.Tensor:
        """input_ids/positions [...] → final hidden states [..., hidden] (after the last norm)."""
        cos, sin = rotary(positions)
        x = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:  # the scale rounded to the model dtype, as the reference does
            x = x * torch.tensor(self.embedding_scale, dtype=x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    weight_mapping = LLAMA_WEIGHT_MAPPING

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.variant = self.variant_for(config)
        self.model = LlamaModel(config, self.variant)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights(config)

    @classmethod
    def variant_for(cls, config: ModelConfig) -> DecoderVariant:
        """The flags of this architecture; a variant overrides this (reading its own config fields
        through config.get_float(...) and friends)."""
        return DecoderVariant()

    def tie_weights(self, config: ModelConfig) -> None:
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., hidden_size] → logits [..., vocab] in the model dtype."""
        logits = self.lm_head(hidden)
        cap = self.variant.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for LlamaForCausalLM and MistralForCausalLM."""
    return build_causal_lm(model_dir, device, options, LlamaForCausalLM, plan)
