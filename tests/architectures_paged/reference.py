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
    # A second backend run on the same cache and batch after the first; max |difference| kept here.
    compare_backend: object | None = None
    backend_diff: float = 0.0
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
        other = None if self.compare_backend is None else PagedContext(c, batch, self.compare_backend)
        n = sum(call["query_lens"])
        worst = 0.0
        dev = c.device
        for layer in range(c.num_layers):
            # Inputs rounded to the cache's dtype first, so the reference sees what the cache holds.
            q = self._rand(n, self.num_heads, c.head_dim).to(c.dtype)
            k = self._rand(n, c.num_kv_heads, c.head_dim).to(c.dtype)
            v = self._rand(n, c.num_kv_heads, c.head_dim).to(c.dtype)
            out = ctx.attend(layer, q.to(dev), k.to(dev), v.to(dev), self.windows[layer], self.scale)
            assert out.shape == q.shape and out.dtype == c.dtype
            if other is not None:
                again = other.attend(layer, q.to(dev), k.to(dev), v.to(dev), self.windows[layer], self.scale)
                self.backend_diff = max(self.backend_diff, float((again.float() - out.float()).abs().max()))
            q, k, v = q.float(), k.float(), v.float()
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


@dataclass
class Seq:
    tokens: list[int]
    table: list[int]
    shared: int = 0


@dataclass
class Scheduler:
    """Drives a model's paged cache like a continuous-batching scheduler (blocks from a shuffled
    free list, shared prefix blocks, freed blocks reused) and checks every call against the same
    model's stateless `forward` over each sequence's full token list."""

    model: object
    seed: int
    seqs: dict[int, Seq] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        spec = self.model.cache_spec
        self.bs = spec.block_size
        self.free = list(range(spec.num_blocks))
        self.rng.shuffle(self.free)

    def fork(self, src: int, dst: int, blocks: int) -> None:
        s = self.seqs[src]
        self.seqs[dst] = Seq(s.tokens[: blocks * self.bs], s.table[:blocks], shared=blocks)

    def release(self, sid: int) -> None:
        s = self.seqs.pop(sid)
        self.free.extend(s.table[s.shared :])

    def build(self, requests: list[tuple[int, int]], is_prefill: bool = True) -> tuple[dict, list]:
        """forward_paged arguments adding n random tokens to each (sequence id, n), and per request
        (sequence id, first new index, end)."""
        vocab = self.model.config.vocab_size
        tokens, positions, slots, tables, ctx, qlens, spans = [], [], [], [], [], [], []
        for sid, n in requests:
            seq = self.seqs.setdefault(sid, Seq([], []))
            start, end = len(seq.tokens), len(seq.tokens) + n
            while len(seq.table) * self.bs < end:
                seq.table.append(self.free.pop())
            new = [self.rng.randrange(vocab) for _ in range(n)]
            seq.tokens += new
            tokens += new
            positions += range(start, end)
            slots += [seq.table[i // self.bs] * self.bs + i % self.bs for i in range(start, end)]
            tables.append(list(seq.table))
            ctx.append(end)
            qlens.append(n)
            spans.append((sid, start, end))
        call = dict(
            input_tokens=torch.tensor(tokens),
            positions=torch.tensor(positions),
            block_tables=tables,
            slot_mapping=torch.tensor(slots),
            context_lens=ctx,
            is_prefill=is_prefill,
            query_lens=qlens,
        )
        return call, spans

    def step(
        self, requests: list[tuple[int, int]], is_prefill: bool = True, all_logits: bool = False
    ) -> float:
        """Run one call and return the largest |logit difference| against `forward`."""
        call, spans = self.build(requests, is_prefill)
        vocab = self.model.config.vocab_size
        logits = self.model.forward_paged(**call, all_logits=all_logits)
        tokens = call["input_tokens"]
        assert logits.dtype == torch.float32
        assert logits.shape == ((len(tokens) if all_logits else len(spans)), vocab)
        worst, row = 0.0, 0
        for i, (sid, start, end) in enumerate(spans):
            full = self.model.forward(torch.tensor([self.seqs[sid].tokens]))[0].cpu()  # [len, vocab]
            if all_logits:
                got, want = logits[row : row + end - start], full[start:end]
            else:
                got, want = logits[i], full[end - 1]
            worst = max(worst, float((got.cpu() - want).abs().max()))
            row += end - start
        return worst
