"""Stacked MoE experts whose projections stay quantized: per expert, one fused gate_up layer and one
down layer (architectures/quantized_linear.py), each with the kernel its shape allows.

A quantized checkpoint (or a Load with `quantization`) stores experts per expert
(`...experts.7.gate_proj.qweight` / `weight_packed` / `weight`), so each expert is a quantized layer of
its own; routing and the grouping of tokens by expert are StackedExperts' (architectures/moe.py),
which calls `expert_mlp` for each expert that received tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from .moe import StackedExperts


class QuantizedExperts(StackedExperts):
    """Same routing as StackedExperts; `gate_up[e]` / `down[e]` are the expert's quantized layers."""

    def __init__(self, like: StackedExperts, gate_up: list[nn.Module], down: list[nn.Module]) -> None:
        nn.Module.__init__(self)  # no stacked dense parameters
        self.num_experts, self.intermediate, self.act = like.num_experts, like.intermediate, like.act
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)

    def expert_mlp(self, expert: int, xs: torch.Tensor) -> torch.Tensor:
        h = self.gate_up[expert](xs)
        n = self.intermediate
        return self.down[expert](self.act(h[:, :n]) * h[:, n:])
