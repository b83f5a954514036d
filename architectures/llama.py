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
from registry.config import RopeScaling
from registry.parallel import SINGLE, ParallelContext, attention_shard, even_range

from .attention import AttentionContext
from .base import CausalLM, build_causal_lm
from .cpu_gemm import Linear
from .layers import FusedLinear, GatedMLP, RMSNorm, RotaryEmbedding, apply_rotary
from .moe import MoeSpec, SparseMoeBlock
from .parallel_layers import (
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    column_parallel_fused,
    sharded_moe_block,
)

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
    """

    qkv_bias: bool = False  # Qwen2: biases on q/k/v (config.attention_bias adds one on o_proj too)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim of q and k before RoPE (q_norm, k_norm)
    norm_offset: float = 0.0  # Gemma: norms scale by (offset + weight), computed in float32
    sandwich_norms: bool = False  # Gemma 2/3: norms after attention and MLP too (four per layer)
    embedding_scale: bool = False  # Gemma: embeddings × sqrt(hidden_size)
    final_logit_softcap: float | None = None  # Gemma 2: logits = cap * tanh(logits / cap)
    attn_logit_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap), in every backend
    query_pre_attn_scalar: float | None = None  # Gemma: softmax scale = this ** -0.5 (None: head_dim)
    # Per-layer windows when the architecture derives them itself (Gemma's 4.x configs: alternating
    # or 5:1 patterns without layer_types); None: config.layer_sliding_windows.
    layer_windows: tuple[int | None, ...] | None = None
    local_rope_theta: float | None = None  # Gemma 3: windowed layers use their own RoPE base
    moe: MoeSpec | None = None  # Qwen-MoE, Mixtral: the sparse MLP block on moe.sparse_layers


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, variant: DecoderVariant, parallel: ParallelContext = SINGLE
    ) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_bias = variant.qkv_bias or config.attention_bias
        if parallel.enabled:  # this rank's KV groups: column-parallel q/k/v, row-parallel o
            d = self.head_dim
            shard = attention_shard(self.num_heads, self.num_kv_heads, parallel.world_size, parallel.rank)
            self.num_heads, self.num_kv_heads = shard.num_heads, shard.num_kv_heads
            q, kv = (shard.q_start * d, shard.num_heads * d), (shard.kv_start * d, shard.num_kv_heads * d)
            full_q, full_kv = config.num_attention_heads * d, config.num_key_value_heads * d
            self.qkv_proj = column_parallel_fused(
                config.hidden_size, (full_q, full_kv, full_kv), (q, kv, kv), qkv_bias
            )
            self.o_proj = RowParallelLinear(
                full_q, q[0], q[1], config.hidden_size, config.attention_bias, parallel
            )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        if not parallel.enabled:
            self.qkv_proj = FusedLinear(
                config.hidden_size, (self.q_size, self.kv_size, self.kv_size), bias=qkv_bias
            )
            self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.attention_bias)
        if variant.qk_norm:  # over head_dim, shared by every head
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, variant.norm_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, variant.norm_offset)
        self.qk_norm = variant.qk_norm
        windows = variant.layer_windows or config.layer_sliding_windows
        self.window = windows[layer_idx]
        self.scale = (variant.query_pre_attn_scalar or self.head_dim) ** -0.5
        self.softcap = variant.attn_logit_softcap

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        lead = x.shape[:-1]  # [batch, seq] (dense) or [num_tokens] (paged)
        qk_size = self.q_size + self.kv_size
        qk, v = self.qkv_proj(x).split((qk_size, self.kv_size), dim=-1)
        if self.qk_norm:
            q, k = qk.split((self.q_size, self.kv_size), dim=-1)
            q = self.q_norm(q.view(*lead, self.num_heads, self.head_dim))
            k = self.k_norm(k.view(*lead, self.num_kv_heads, self.head_dim))
            qk = torch.cat((q, k), dim=-2)
        else:  # q and k are adjacent columns of the fused output: their heads in one view
            qk = qk.view(*lead, self.num_heads + self.num_kv_heads, self.head_dim)
        # RoPE turns q's and k's heads alike: one op sequence over both instead of two.
        q, k = apply_rotary(qk, cos, sin).split((self.num_heads, self.num_kv_heads), dim=-2)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        if self.softcap is None:
            out = ctx.attend(self.layer_idx, q, k, v, self.window, self.scale)
        else:
            out = ctx.attend(self.layer_idx, q, k, v, self.window, self.scale, softcap=self.softcap)
        return self.o_proj(out.reshape(*lead, self.q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, variant: DecoderVariant, parallel: ParallelContext = SINGLE
    ) -> None:
        super().__init__()
        hidden, eps, offset = config.hidden_size, config.rms_norm_eps, variant.norm_offset
        self.input_layernorm = RMSNorm(hidden, eps, offset)
        self.self_attn = LlamaAttention(config, layer_idx, variant, parallel)
        # Llama: post_attention_layernorm is the MLP's input norm. Sandwich (Gemma 2/3, checkpoint
        # names): it normalizes the attention output, and the MLP gets pre/post_feedforward norms.
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset)
        if variant.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset)
        self.sandwich = variant.sandwich_norms
        moe = variant.moe
        if moe is not None and layer_idx in moe.sparse_layers:
            self.mlp_name = moe.module_name
            if parallel.enabled:
                block = sharded_moe_block(
                    config.hidden_size, config.hidden_act, moe, config.architecture, parallel
                )
            else:
                block = SparseMoeBlock(config.hidden_size, config.hidden_act, moe)
            setattr(self, moe.module_name, block)
        else:
            self.mlp_name = "mlp"
            self.mlp = make_mlp(config, parallel)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        mlp = getattr(self, self.mlp_name)  # Mixtral's checkpoint calls it block_sparse_moe
        if self.sandwich:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, ctx))
            return x + self.post_feedforward_layernorm(mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(
        self, config: ModelConfig, variant: DecoderVariant, parallel: ParallelContext = SINGLE
    ) -> None:
        super().__init__()
        if parallel.enabled:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, parallel)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, variant, parallel) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, variant.norm_offset)
        self.embedding_scale = config.hidden_size**0.5 if variant.embedding_scale else None
        self.config = config
        self.local_rope_theta = variant.local_rope_theta
        self._local_rotary: RotaryEmbedding | None = None

    def local_rotary(self, rotary: RotaryEmbedding) -> RotaryEmbedding:
        """Gemma 3's RoPE of the windowed layers: its own base, no scaling, same device and dtype."""
        local = self._local_rotary
        if local is None or local.device != rotary.device or local.dtype != rotary.dtype:
            local = RotaryEmbedding(
                self.config, rotary.device, rotary.dtype, theta=self.local_rope_theta, scaling=RopeScaling()
            )
            self._local_rotary = local
        return local

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, rotary: RotaryEmbedding, ctx: AttentionContext
    ) -> torch.Tensor:
        """input_ids/positions [...] → final hidden states [..., hidden] (after the last norm)."""
        cos, sin = rotary(positions)
        local = None
        if self.local_rope_theta is not None:
            local = self.local_rotary(rotary)(positions)
        x = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:  # the scale rounded to the model dtype, as the reference does
            x = x * torch.tensor(self.embedding_scale, dtype=x.dtype)
        for layer in self.layers:
            if local is not None and layer.self_attn.window is not None:
                x = layer(x, *local, ctx)
            else:
                x = layer(x, cos, sin, ctx)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    weight_mapping = LLAMA_WEIGHT_MAPPING
    # Built sharded when given a ParallelContext of several ranks (build_causal_lm checks this).
    supports_tensor_parallel = True

    def __init__(self, config: ModelConfig, parallel: ParallelContext = SINGLE) -> None:
        super().__init__()
        self.variant = self.variant_for(config)
        # The MoE block syncs expert counts to the host each call: no CUDA graph capture.
        self.cuda_graph_safe = self.variant.moe is None
        self.model = LlamaModel(config, self.variant, parallel)
        if parallel.enabled:
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, parallel)
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
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


def make_mlp(config: ModelConfig, parallel: ParallelContext = SINGLE) -> GatedMLP:
    """The gated MLP; under tensor parallelism this rank's intermediate rows (gate/up column-parallel,
    down row-parallel), split as evenly as possible."""
    mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
    if not parallel.enabled:
        return mlp
    full = config.intermediate_size
    start, end = even_range(full, parallel.world_size, parallel.rank)
    rows = (start, end - start)
    mlp.gate_up_proj = column_parallel_fused(config.hidden_size, (full, full), (rows, rows), config.mlp_bias)
    mlp.down_proj = RowParallelLinear(full, start, end - start, config.hidden_size, config.mlp_bias, parallel)
    mlp.intermediate = end - start
    return mlp


def build(
    model_dir: Path, device: torch.device, options: LoadOptions, *, plan: LoadPlan | None = None
) -> CausalLM:
    """Builder for LlamaForCausalLM and MistralForCausalLM."""
    return build_causal_lm(model_dir, device, options, LlamaForCausalLM, plan)
