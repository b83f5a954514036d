"""An independent reference for paged attention: every sequence's full K/V kept densely on the
side, attention computed naively in float64 (explicit scores, mask and softmax; no SDPA), and a
small scheduler that drives a PagedKvCache the way a continuous-batching server does (blocks
handed out from a shuffled free list, shared prefix blocks, freed blocks reused)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from architectures.paged import PagedContext, PagedKvCache, prepare_paged_batch


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float
) -> torch.Tensor:
    """q [L, H, D]: the last L of the sequence's len(k) tokens; k/v [C, Hkv, D] → [L, H, D] (float64).

    Query head h reads KV head h // (H / Hkv); query l at position C - L + l sees keys j with
    j <= p and j > p - window.
    """
    length, heads, _ = q.shape
    ctx, kv_heads, _ = k.shape
    head_to_kv = torch.arange(heads) // (heads // kv_heads)
    kk = k.double()[:, head_to_kv]  # [C, H, D]
    vv = v.double()[:, head_to_kv]
    scores = torch.einsum("lhd,chd->hlc", q.double(), kk) * scale
    q_pos = torch.arange(ctx - length, ctx)[:, None]
    k_pos = torch.arange(ctx)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hlc,chd->lhd", probs, vv)


@dataclass
class SimSeq:
    table: list[int]
    k: list[torch.Tensor]  # per layer [len, Hkv, D]
    v: list[torch.Tensor]
    shared_blocks: int = 0  # leading blocks owned by another sequence (a cached prefix)

    @property
    def length(self) -> int:
        return int(self.k[0].shape[0])


@dataclass
class PagedSim:
    cache: PagedKvCache
    backend: object
    num_heads: int
    windows: list[int | None]  # per layer
    seed: int = 0
    vocab_size: int = 1000
    max_positions: int = 1 << 20
    seqs: dict[int, SimSeq] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.free = list(range(self.cache.num_blocks))
        self.rng.shuffle(self.free)
        self.scale = self.cache.head_dim**-0.5

    def _rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def _empty_kv(self) -> list[torch.Tensor]:
        c = self.cache
        return [torch.zeros(0, c.num_kv_heads, c.head_dim) for _ in range(c.num_layers)]

    def fork(self, src: int, dst: int, blocks: int) -> None:
        """dst starts with the first `blocks` full blocks of src, shared (prefix caching)."""
        s, bs = self.seqs[src], self.cache.block_size
        assert s.length >= blocks * bs
        n = blocks * bs
        self.seqs[dst] = SimSeq(
            s.table[:blocks], [t[:n].clone() for t in s.k], [t[:n].clone() for t in s.v], shared_blocks=blocks
        )

    def release(self, sid: int) -> None:
        s = self.seqs.pop(sid)
        self.free.extend(s.table[s.shared_blocks :])

    def build_call(self, requests: list[tuple[int, int]], is_prefill: bool) -> dict:
        """Arguments of one forward_paged call adding `n` tokens to each (seq id, n); allocates blocks."""
        bs = self.cache.block_size
        tokens, positions, slots, tables, ctx_lens, q_lens = [], [], [], [], [], []
        for sid, n in requests:
            seq = self.seqs.setdefault(sid, SimSeq([], self._empty_kv(), self._empty_kv()))
            start, end = seq.length, seq.length + n
            while len(seq.table) * bs < end:
                seq.table.append(self.free.pop())
            tokens += [self.rng.randrange(self.vocab_size) for _ in range(n)]
            positions += list(range(start, end))
            slots += [seq.table[i // bs] * bs + i % bs for i in range(start, end)]
            tables.append(list(seq.table))
            ctx_lens.append(end)
            q_lens.append(n)
        return dict(
            input_tokens=torch.tensor(tokens),
            positions=torch.tensor(positions),
            block_tables=tables,
            slot_mapping=torch.tensor(slots),
            context_lens=ctx_lens,
            is_prefill=is_prefill,
            query_lens=q_lens,
        )

    def step(self, requests: list[tuple[int, int]], is_prefill: bool = True) -> float:
        """Run one call through every layer; returns the largest |paged - reference| seen."""
        c = self.cache
        call = self.build_call(requests, is_prefill)
        batch = prepare_paged_batch(
            c, **call, vocab_size=self.vocab_size, max_position_embeddings=self.max_positions
        )
        ctx = PagedContext(c, batch, self.backend)
        n = sum(call["query_lens"])
        worst = 0.0
        for layer in range(c.num_layers):
            q = self._rand(n, self.num_heads, c.head_dim)
            k = self._rand(n, c.num_kv_heads, c.head_dim)
            v = self._rand(n, c.num_kv_heads, c.head_dim)
            out = ctx.attend(
                layer, q.to(c.dtype), k.to(c.dtype), v.to(c.dtype), self.windows[layer], self.scale
            )
            assert out.shape == q.shape
            row = 0
            for sid, length in requests:
                seq = self.seqs[sid]
                seq.k[layer] = torch.cat([seq.k[layer], k[row : row + length]])
                seq.v[layer] = torch.cat([seq.v[layer], v[row : row + length]])
                ref = naive_attention(
                    q[row : row + length], seq.k[layer], seq.v[layer], self.windows[layer], self.scale
                )
                got = out[row : row + length].double().cpu()
                worst = max(worst, float((got - ref).abs().max()))
                row += length
        return worst
