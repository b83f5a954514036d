"""The sparse mixture-of-experts block shared by Qwen2-MoE, Qwen3-MoE and Mixtral.

Compute path (the same on CPU and CUDA), for tokens x [T, hidden]:

1. Router: logits = x @ gate.T [T, E]; softmax in float32; top-k experts per token
   (ids [T, k], weights [T, k] float32), renormalised to sum 1 when `norm_topk_prob` (Mixtral
   always, Qwen when its config says so).
2. Grouping: the T * k (token, expert) pairs are sorted by expert id (one stable argsort) and
   counted per expert (one bincount, one host sync); no loop over tokens.
3. Experts: a loop over the experts that received tokens only. Each gathers its tokens
   (index_select), runs down(act(gate(x)) * up(x)) as matmuls over its slice of the stacked weights
   (gate_up_proj [E, 2 * intermediate, hidden], down_proj [E, hidden, intermediate]; views, no
   copies), scales by the routing weights and index_adds into a float32 accumulator [T, hidden].
4. Qwen2-MoE's shared expert (a dense gated MLP, gated per token by sigmoid(shared_expert_gate(x)))
   is added; the result is cast back to the model dtype.

Tensor parallelism (architectures.parallel_layers.sharded_moe_block): each expert's intermediate
rows are split over the ranks (gate_up_proj column-parallel per expert, down_proj row-parallel), the
shared expert likewise, the router replicated; every rank then holds a partial sum of the block's
output, all-reduced once (`parallel`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from registry.parallel import SINGLE

from .layers import ACTIVATIONS, GatedMLP


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts MLP, read by each architecture from its own config fields."""

    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    norm_topk_prob: bool
    sparse_layers: frozenset[int]  # layers whose MLP is the sparse block (the rest stay dense)
    module_name: str = "mlp"  # checkpoint name of the layer's MLP (Mixtral: block_sparse_moe)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a sigmoid-gated shared expert (0: none)
    intermediate_field: str = "moe_intermediate_size"  # the config field of intermediate_size (errors)


class StackedExperts(nn.Module):
    """E gated MLPs with their weights stacked on dim 0, fed only the tokens routed to them."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        # Checkpoint gate/up fill rows [0, I) / [I, 2I) of each expert's gate_up_proj slice.
        self.expert_shard_sizes = {"gate_up_proj": (intermediate, intermediate), "down_proj": None}
        self.num_experts = num_experts
        self.intermediate = intermediate
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], expert_ids [T, k] (long), weights [T, k] (float32) → [T, hidden] float32."""
        top_k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert
        token_of = order // top_k  # [T * k] token of each sorted pair
        pair_weights = weights.reshape(-1).index_select(0, order)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            start += count
            tokens = token_of[rows]
            y = self.expert_mlp(expert, x.index_select(0, tokens))
            out.index_add_(0, tokens, y.float() * pair_weights[rows, None])
        return out

    def expert_mlp(self, expert: int, xs: torch.Tensor) -> torch.Tensor:
        """One expert's gated MLP on its tokens (QuantizedExperts overrides it)."""
        n, w = self.intermediate, self.gate_up_proj[expert]
        return F.linear(self.act(F.linear(xs, w[:n])) * F.linear(xs, w[n:]), self.down_proj[expert])


class SparseMoeBlock(nn.Module):
    """Router (`gate`), stacked experts and the optional shared expert; see the module docstring."""

    def __init__(self, hidden: int, act: str, spec: MoeSpec) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, spec.num_experts, bias=False)
        self.experts = StackedExperts(spec.num_experts, hidden, spec.intermediate_size, act)
        self.top_k = spec.top_k
        self.norm_topk_prob = spec.norm_topk_prob
        if spec.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden, spec.shared_expert_intermediate_size, act, bias=False)
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        self.has_shared_expert = bool(spec.shared_expert_intermediate_size)
        self.parallel = SINGLE  # sharded: the ranks' partial sums are added here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] → [..., hidden]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)  # [T, E]
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, expert_ids, weights)
        if self.has_shared_expert:
            shared = self.shared_expert(x) * torch.sigmoid(self.shared_expert_gate(x))
            out = out + shared.float()
        out = self.parallel.all_reduce(out)
        return out.to(x.dtype).reshape(shape)
