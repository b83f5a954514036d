"""Layers shared by every architecture: RMSNorm, rotary embeddings (all supported scalings), fused
linear projections and the gated MLP. Architecture files assemble them with keyword flags."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from registry.config import ModelConfig, RopeScaling

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
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:
            return ((self.offset + self.weight.float()) * normed).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class FusedLinear(nn.Linear):
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
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = ACTIVATIONS[act]
        self.intermediate = intermediate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.gate_up_proj, nn.Linear):  # quantized: one fused matmul, then split
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act(gate) * up)
        n, w, b = self.intermediate, self.gate_up_proj.weight, self.gate_up_proj.bias
        gate = F.linear(x, w[:n], None if b is None else b[:n])
        up = F.linear(x, w[n:], None if b is None else b[n:])
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


class RotaryEmbedding:
    """cos/sin for any positions. Static scalings use a table over every position; `dynamic`
    recomputes its frequencies from the longest position of the call, as the reference does."""

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.config = config
        self.dtype = dtype
        self.device = device
        self.dynamic = config.rope_scaling.rope_type == "dynamic"
        if not self.dynamic:
            self.cos, self.sin = self._table(config.position_limit, None)

    def _table(self, length: int, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        inv_freq, attn_scale = rope_inv_freq(
            c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings, seq_len
        )
        freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * attn_scale).to(device=self.device, dtype=self.dtype)
        sin = (emb.sin() * attn_scale).to(device=self.device, dtype=self.dtype)
        return cos, sin

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] → cos, sin [..., 1, head_dim] (broadcast over heads)."""
        if self.dynamic:
            longest = int(positions.max()) + 1 if positions.numel() else 1
            cos, sin = self._table(longest, longest)
        else:
            cos, sin = self.cos, self.sin
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin
