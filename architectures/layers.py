"""Layers shared by every architecture: RMSNorm, rotary embeddings (all supported scalings), fused
linear projections and the gated MLP. Architecture files assemble them with keyword flags."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from registry.config import ModelConfig, RopeScaling

from .cpu_gemm import Linear

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    """RMS norm over the last dim. offset 0 (Llama): weight * norm(x), scaled in the input dtype.
    offset 1 (Gemma): (1 + weight) * norm(x), scaled in float32 — each as its reference does."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.offset and x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # F.rms_norm's own ops, to the bit, without its three wrapper dispatches (~1% of a
            # SmolLM2 decode step: 61 norms a step, each op paid with cold caches).
            return x.mul(torch.rsqrt(x.pow(2).mean(-1, keepdim=True).add_(self.eps))).mul_(self.weight)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:
            return ((self.offset + self.weight.float()) * normed).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class FusedLinear(Linear):
    """Several projections of one input in one matmul; `shard_sizes` tells the weight loader which
    output rows each checkpoint tensor fills (q/k/v, gate/up)."""

    def __init__(self, in_features: int, shard_sizes: tuple[int, ...], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_sizes = shard_sizes


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate and up stored as one fused parameter.

    The two halves are applied as two matmuls over row ranges of the fused weight (views, no copy):
    on CPU (MKL) that is 2-4% faster than one matmul over both and a split of its output, and act()
    then reads a contiguous tensor instead of a strided half.
    """

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden, (intermediate, intermediate), bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act = ACTIVATIONS[act]
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.gate_up_proj, nn.Linear):  # quantized: one fused matmul, then split
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        fused = self.gate_up_proj
        n, w, b, gemm = self.intermediate, fused.weight, fused.bias, fused.gemm
        gate = gemm(x, w[:n], None if b is None else b[:n])
        up = gemm(x, w[n:], None if b is None else b[n:])
        return self.down_proj(self.act(gate) * up)


# -- rotary embeddings --------------------------------------------------------------------------


def rope_inv_freq(
    head_dim: int, theta: float, scaling: RopeScaling, max_positions: int, seq_len: int | None = None
):
    """Inverse frequencies [head_dim // 2] (float32) and the attention scaling applied to cos/sin."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    kind = scaling.rope_type
    if kind == "default":
        return 1.0 / (theta**exponents), 1.0
    if kind == "linear":
        return 1.0 / (theta**exponents) / scaling.factor, 1.0
    if kind == "dynamic":
        # NTK-aware: the base grows with the longest position of the call beyond the trained length.
        seq_len = max(seq_len or max_positions, max_positions)
        base = theta * ((scaling.factor * seq_len / max_positions) - (scaling.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        return 1.0 / (base**exponents), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(1.0 / (theta**exponents), scaling, max_positions), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling, max_positions)
    if kind == "longrope":
        return _longrope_inv_freq(head_dim, theta, scaling, max_positions, seq_len)
    raise ValueError(f"unsupported rope type {kind!r}")  # ModelConfig already refuses these


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling, max_positions: int) -> torch.Tensor:
    old_len = s.original_max_position_embeddings or max_positions
    low_wavelen = old_len / s.low_freq_factor
    high_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, base: float, s: RopeScaling, max_positions: int) -> tuple[torch.Tensor, float]:
    original = s.original_max_position_embeddings or max_positions
    factor = s.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.attention_factor
    if attention_factor is None:
        if s.mscale and s.mscale_all_dim:
            attention_factor = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency per dimension
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def _longrope_inv_freq(
    dim: int, base: float, s: RopeScaling, max_positions: int, seq_len: int | None
) -> tuple[torch.Tensor, float]:
    """Phi-3 LongRoPE: frequencies divided by the short factors up to the pretrained length and by
    the long ones beyond it (chosen per call from its longest position, as the reference does)."""
    original = s.original_max_position_embeddings or max_positions
    factor = s.factor
    attention_factor = s.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext = torch.tensor(s.long_factor if long else s.short_factor, dtype=torch.float32)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (ext * base**exponents), float(attention_factor)


class RotaryEmbedding:
    """cos/sin for the positions of a call, over the rotary part of head_dim (`partial_rotary_factor`),
    computed per call (no table over every position: a config with millions of positions costs
    nothing until they are used). Static scalings keep their frequencies; `dynamic` recomputes them
    from the longest position of the call, and `longrope` picks its short or long factors from it, as
    the reference does. `theta`/`scaling` override the config's (Gemma 3's local layers)."""

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        *,
        theta: float | None = None,
        scaling: RopeScaling | None = None,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.theta = config.rope_theta if theta is None else theta
        self.scaling = config.rope_scaling if scaling is None else scaling
        self.rotary_dim = int(config.head_dim * self.scaling.partial_rotary_factor)
        self.dynamic = self.scaling.rope_type == "dynamic"
        self.long_from: int | None = None  # longrope: calls reaching this length use the long factors
        if not self.dynamic:
            self._freqs = self._frequencies(None)
        if self.scaling.rope_type == "longrope":
            self.long_from = self.scaling.original_max_position_embeddings or config.max_position_embeddings
            self._long_freqs = self._frequencies(self.long_from + 1)

    def _frequencies(self, seq_len: int | None) -> tuple[torch.Tensor, float]:
        c = self.config
        inv_freq, attn_scale = rope_inv_freq(
            self.rotary_dim, self.theta, self.scaling, c.max_position_embeddings, seq_len
        )
        return inv_freq.to(self.device), attn_scale

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] → cos, sin [..., 1, rotary_dim] (broadcast over heads); sin's first half
        negated (rotate_half's sign: see apply_rotary)."""
        if self.dynamic:
            longest = int(positions.max()) + 1 if positions.numel() else 1
            inv_freq, attn_scale = self._frequencies(longest)
        elif self.long_from is not None and positions.numel() and int(positions.max()) + 1 > self.long_from:
            inv_freq, attn_scale = self._long_freqs
        else:
            inv_freq, attn_scale = self._freqs
        freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * attn_scale).to(self.dtype)
        sin = (emb.sin() * attn_scale).to(self.dtype)
        half = sin.shape[-1] // 2
        # rotate_half's sign folded into sin, once per call: apply_rotary then needs no neg/cat per layer
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim]; cos/sin [..., rotary_dim] from RotaryEmbedding (sin's first half negated):
    partial rotary turns the first rotary_dim.

    The reference's x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1), is
    cat(x2, x1) * cat(-sin1, sin2) to the bit (negation is exact): one roll instead of two slices,
    a neg and a cat per layer."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + x.roll(d // 2, -1) * sin
    rot, rest = x[..., :d], x[..., d:]
    return torch.cat((rot * cos + rot.roll(d // 2, -1) * sin, rest), dim=-1)
