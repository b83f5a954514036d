"""Llama 2/3/3.1 and Mistral (Llama with a sliding window), read top to bottom:
Attention → MLP → DecoderLayer → Model → ForCausalLM, then the builder.

Qwen2 is the same network with q/k/v biases (`qkv_bias`); see qwen2.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from registry import FusedPart, LoadOptions, ModelConfig, WeightMapping

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


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qkv_bias: bool) -> None:
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
            bias=qkv_bias or config.attention_bias,
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        self.window = config.layer_sliding_windows[layer_idx]
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        lead = x.shape[:-1]  # [batch, seq] (dense) or [num_tokens] (paged)
        q, k, v = self.qkv_proj(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = apply_rotary(q.view(*lead, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(*lead, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        out = ctx.attend(self.layer_idx, q, k, v, self.window, self.scale)
        return self.o_proj(out.reshape(*lead, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, qkv_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_idx, qkv_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, qkv_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, qkv_bias) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, ctx: AttentionContext
    ) -> torch.Tensor:
        """input_ids/positions [...] → final hidden states [..., hidden] (after the last norm)."""
        cos, sin = rotary(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    weight_mapping = LLAMA_WEIGHT_MAPPING

    def __init__(self, config: ModelConfig, qkv_bias: bool = False) -> None:
        super().__init__()
        self.model = LlamaModel(config, qkv_bias)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights(config)

    def tie_weights(self, config: ModelConfig) -> None:
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


def build(model_dir: Path, device: torch.device, options: LoadOptions) -> CausalLM:
    """Builder for LlamaForCausalLM and MistralForCausalLM."""
    return build_causal_lm(
        model_dir, device, options, lambda cfg: LlamaForCausalLM(cfg), LlamaForCausalLM.weight_mapping
    )
