"""Sampling on the worker: vLLM's order of logits processing, seeded draws, logprobs, and the
accept/reject of speculative verification. Model-side torch code; the servicer converts the proto.

One call handles a batch of sequences. Sequence s owns `d_s + 1` consecutive rows of the logits
[rows, vocab] it is given: row j scores the token after its j-th draft (d_s = 0 without drafts, so
a plain step has one row per sequence). Every transform is one vectorized op over all rows:

    raw logprobs → repetition penalty → frequency / presence → temperature → min_p → top_k → top_p
    → draw (greedy rows: argmax)

A draw is the inverse CDF in vocabulary order: one uniform u per sequence, the first token whose
cumulative mass exceeds u times the row's total (no normalization needed, filtered tokens have no
mass). One uniform per row, not an exponential per vocabulary entry, keeps it cheap on CPU. A
seeded sequence takes its uniforms (its drafts' first) from a generator derived from (seed,
context_len), so it draws the same token alone or batched with any others.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20
# Below this a temperature means greedy (as vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling; the defaults are "off" (greedy, no filter, no penalty)."""

    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; counts prompt and output tokens
    presence_penalty: float = 0.0  # counts output tokens only
    frequency_penalty: float = 0.0
    seed: int | None = None
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()
    logprobs: int = 0  # 0..MAX_LOGPROBS top candidates besides the chosen token

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def penalized(self) -> bool:
        repetition = self.repetition_penalty not in (0.0, 1.0)
        return repetition or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or 0.0 < self.top_p < 1.0 or self.min_p > 0.0

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: nothing to process and no logprobs to report."""
        return self.greedy and not self.penalized and not self.logprobs


GREEDY = SamplingParams()


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class SequenceSample:
    """What one sequence emitted: accepted drafts, then the correction or bonus token."""

    token_ids: list[int]
    num_accepted_drafts: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


def seeded_generator_seed(seed: int, context_len: int) -> int:
    """A 63-bit generator seed from (seed, context_len): splitmix64 over the pair."""
    x = (seed * 0x9E3779B97F4A7C15 + context_len + 0x632BE59BD9B4E019) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, fallback: torch.Tensor | None) -> torch.Tensor:
    """Per row, the first token whose cumulative mass exceeds u * the row's mass. probs [rows, vocab]
    (unnormalized is fine), u [rows]; fallback [rows] (the argmax; None: computed when needed) where
    rounding lands past the last token with mass."""
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    picked = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
    empty = probs.gather(1, picked.unsqueeze(1)).squeeze(1) <= 0
    if bool(empty.any()):
        picked = torch.where(empty, probs.argmax(dim=-1) if fallback is None else fallback, picked)
    return picked


def verification_rows(query_lens: Sequence[int], num_drafts: Sequence[int]) -> list[int]:
    """Indices into all-token logits [num_tokens, vocab] of the rows `Sampler.sample` takes: for
    each sequence its last d + 1 query positions (the last one only without drafts)."""
    rows, end = [], 0
    for q, d in zip(query_lens, num_drafts, strict=True):
        end += q
        rows.extend(range(end - d - 1, end))
    return rows


# -- the transforms, each over [rows, vocab] with per-row parameters [rows] -------------------------
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF's rule on tokens seen in prompt or output: positive logits divided, negative multiplied.
    seen: bool [rows, vocab]; penalty: [rows] (1 = off)."""
    p = penalty.unsqueeze(1).expand_as(logits)
    scaled = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, scaled, logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's rule: logit -= frequency * count + presence * (count > 0). counts: [rows, vocab]."""
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide by the temperature; greedy rows (temperature ~0) are left as they are."""
    t = torch.where(temperature < GREEDY_EPS, torch.ones_like(temperature), temperature)
    return logits / t.unsqueeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's. min_p: [rows] (0 = off)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k logits (0 = off), then the smallest set of the rest whose probability
    (renormalized after top_k) reaches top_p (1 = off). Sorts only when some row asks for top_p."""
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), torch.full_like(top_k, vocab), top_k)
    if not bool((top_p < 1.0).any()):
        limited = k < vocab
        if not bool(limited.any()):
            return logits
        max_k = int(k[limited].max())
        values = fast_topk(logits, max_k)[0]  # [rows, max_k], best first
        kth = values.gather(1, (k.clamp(max=max_k) - 1).unsqueeze(1))
        kth = kth.masked_fill(~limited.unsqueeze(1), float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
    if compact_applies(top_k, vocab):
        values, ids = compact_top_k_top_p(logits, k, top_p)
        return torch.full_like(logits, float("-inf")).scatter_(1, ids, values)
    ordered, order = logits.sort(dim=-1)  # ascending
    kth = ordered.gather(1, (vocab - k).unsqueeze(1))
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # the top token always stays
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)


def fast_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k) of rows [rows, vocab] for a small k, best first, without a selection over
    every row (torch.topk over 49k entries costs about thirty elementwise passes on CPU).

    The k-th largest of 256 chunk maxima is a lower bound of the row's k-th largest (the maxima are
    k distinct entries), so the entries at or above it hold the top k; they are few, and a topk over
    them, padded per row, is cheap. Falls back to torch.topk when the bound keeps too many."""
    rows, vocab = x.shape
    size = max(1, vocab // 256)
    chunks = vocab // size
    if k * 4 > chunks or vocab < 4096:
        return x.topk(k, dim=-1)
    maxima = x[:, : chunks * size].unflatten(1, (chunks, size)).amax(dim=-1)  # [rows, chunks]
    bound = maxima.topk(k, dim=-1).values[:, -1:]
    if not bool(torch.isfinite(bound).all()):  # fewer than k finite maxima: the bound says nothing
        return x.topk(k, dim=-1)
    row_ids, col_ids = (x >= bound).nonzero(as_tuple=True)  # row-major
    counts = torch.bincount(row_ids, minlength=rows)
    width = int(counts.max())
    if width > 16 * k + 1024:  # many near-equal values
        return x.topk(k, dim=-1)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(row_ids.numel(), device=x.device) - starts[row_ids]
    values = torch.full((rows, width), float("-inf"), dtype=x.dtype, device=x.device)
    ids = torch.zeros((rows, width), dtype=torch.long, device=x.device)
    values[row_ids, slot] = x[row_ids, col_ids]
    ids[row_ids, slot] = col_ids
    top, where = values.topk(k, dim=-1)
    return top, ids.gather(1, where)


def compact_applies(top_k: torch.Tensor, vocab: int) -> bool:
    """Every row has a top_k of at most a quarter of the vocabulary: work on its candidates only."""
    return bool(((top_k > 0) & (top_k <= vocab)).all()) and int(top_k.max()) * 4 <= vocab


def compact_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """top_k then top_p over each row's max_k best candidates: (values, ids) [rows, max_k], best
    first, filtered entries -inf. In descending order a token stays while the mass before it is
    below top_p, which is the ascending rule (drop while the mass up to it is <= 1 - top_p)."""
    max_k = int(k.max())
    values, ids = fast_topk(logits, max_k)
    values = values.masked_fill(torch.arange(max_k, device=k.device) >= k.unsqueeze(1), float("-inf"))
    probs = values.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    return values.masked_fill(before >= top_p.unsqueeze(1), float("-inf")), ids


# -- the sampler ------------------------------------------------------------------------------------
class Sampler:
    """Draws for every call of a worker. Unseeded sequences share one generator per device."""

    def __init__(self, seed: int | None = None) -> None:
        self._seed = secrets.randbits(63) if seed is None else seed
        self._generators: dict[torch.device, torch.Generator] = {}
        self._lock = threading.Lock()

    def generator(self, device: torch.device) -> torch.Generator:
        with self._lock:
            gen = self._generators.get(device)
            if gen is None:
                gen = self._generators[device] = torch.Generator(device=device)
                gen.manual_seed(seeded_generator_seed(self._seed, len(self._generators)))
            return gen

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        context_lens: Sequence[int],
        drafts: Sequence[Sequence[int]] | None = None,
        processed_logprobs: bool = False,
    ) -> list[SequenceSample]:
        """logits: [sum(d_s + 1), vocab] (float32), params/context_lens/drafts: one per sequence."""
        num_seqs = len(params)
        drafts = drafts if drafts is not None else [()] * num_seqs
        num_drafts = [len(d) for d in drafts]
        rows = sum(num_drafts) + num_seqs
        if logits.dim() != 2 or logits.shape[0] != rows:
            raise ValueError(f"logits {list(logits.shape)} for {num_seqs} sequences with {rows} rows")
        if not any(num_drafts) and all(p.plain_greedy for p in params):
            return [SequenceSample([t]) for t in logits.argmax(dim=-1).tolist()]
        return _Step(self, logits.float(), params, context_lens, drafts, processed_logprobs).run()


def process_logits(
    logits: torch.Tensor, params: Sequence[SamplingParams], drafts: Sequence[Sequence[int]] | None = None
) -> torch.Tensor:
    """The processed logits [rows, vocab] a step samples from (filtered tokens -inf); rows as in
    `Sampler.sample`. Greedy rows skip the temperature."""
    drafts = drafts if drafts is not None else [()] * len(params)
    return _Step(None, logits.float(), params, [0] * len(params), drafts, False).process()


class _Step:
    """One `Sampler.sample` call: per-row parameter tensors, processing, drafts, draws, logprobs."""

    def __init__(
        self,
        sampler: Sampler | None,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        context_lens: Sequence[int],
        drafts: Sequence[Sequence[int]],
        processed_logprobs: bool,
    ) -> None:
        self.sampler = sampler
        self.raw = logits
        self.device = logits.device
        self.params = params
        self.context_lens = context_lens
        self.drafts = drafts
        self.processed_logprobs = processed_logprobs
        self.num_drafts = [len(d) for d in drafts]
        self.compact: tuple[torch.Tensor, torch.Tensor] | None = None  # (values, ids) after top_k/top_p
        # Sequence s owns rows [offsets[s], offsets[s] + d_s]; row_seq maps a row to its sequence.
        self.offsets: list[int] = []
        total = 0
        for d in self.num_drafts:
            self.offsets.append(total)
            total += d + 1
        self.row_seq = torch.repeat_interleave(
            torch.arange(len(params), device=self.device),
            torch.tensor([d + 1 for d in self.num_drafts], device=self.device),
        )

    def _per_row(self, values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)[self.row_seq]

    def process(self) -> torch.Tensor:
        """The processed logits [rows, vocab]: filtered tokens are -inf. One copy of the logits, then
        in-place passes; penalties touch only the (row, token) pairs they name."""
        params = self.params
        logits = self.raw.clone()
        if any(p.penalized for p in params):
            self._apply_penalties(logits)
        if not all(p.greedy for p in params):
            t = [1.0 if p.greedy else p.temperature for p in params]
            logits.div_(self._per_row(t, logits.dtype).unsqueeze(1))
        if any(p.min_p > 0 for p in params):
            # p < min_p * p_max  <=>  logit < logit_max + log(min_p): no softmax needed.
            log_min_p = self._per_row([p.min_p for p in params], logits.dtype).log().unsqueeze(1)
            logits.masked_fill_(logits < logits.amax(dim=-1, keepdim=True) + log_min_p, float("-inf"))
        if any(p.top_k > 0 or 0 < p.top_p < 1 for p in params):
            top_k = self._per_row([p.top_k for p in params], torch.long)
            top_p = self._per_row([p.top_p if 0 < p.top_p < 1 else 1.0 for p in params], logits.dtype)
            if compact_applies(top_k, logits.shape[1]):  # keep the candidates: the draw needs no more
                self.compact = compact_top_k_top_p(logits, top_k, top_p)
                values, ids = self.compact
                return torch.full_like(logits, float("-inf")).scatter_(1, ids, values)
            logits = apply_top_k_top_p(logits, top_k, top_p)
        return logits

    def _apply_penalties(self, logits: torch.Tensor) -> None:
        """Repetition (prompt and output tokens), frequency and presence (output tokens; row j of a
        sequence also counts its first j drafts, outputs once accepted), on the named pairs only."""
        vocab, device = logits.shape[1], self.device
        out_rows: list[int] = []
        out_ids: list[int] = []
        prompt_rows: list[int] = []
        prompt_ids: list[int] = []
        for s, p in enumerate(self.params):
            if not p.penalized:
                continue
            for j in range(self.num_drafts[s] + 1):
                row = self.offsets[s] + j
                n = len(p.output_token_ids) + j
                out_rows += [row] * n
                out_ids += p.output_token_ids
                out_ids += self.drafts[s][:j]
                prompt_rows += [row] * len(p.prompt_token_ids)
                prompt_ids += p.prompt_token_ids

        def keys(rows: list[int], ids: list[int]) -> torch.Tensor:
            return torch.tensor(rows, dtype=torch.long, device=device) * vocab + torch.tensor(
                ids, dtype=torch.long, device=device
            )

        out_keys, counted = keys(out_rows, out_ids).unique(return_counts=True)
        pairs = torch.cat([out_keys, keys(prompt_rows, prompt_ids)]).unique()  # sorted
        if not pairs.numel():
            return
        at = torch.searchsorted(out_keys, pairs).clamp_(max=max(out_keys.numel() - 1, 0))
        hit = out_keys[at] == pairs if out_keys.numel() else torch.zeros_like(pairs, dtype=torch.bool)
        count = torch.where(hit, counted[at] if out_keys.numel() else 0, 0).to(logits.dtype)
        rows, tokens = pairs // vocab, pairs % vocab
        seq = self.row_seq[rows]

        def per_pair(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=logits.dtype, device=device)[seq]

        rep = per_pair([p.repetition_penalty or 1.0 for p in self.params])
        freq = per_pair([p.frequency_penalty for p in self.params])
        pres = per_pair([p.presence_penalty for p in self.params])
        values = logits[rows, tokens]
        values = torch.where(values > 0, values / rep, values * rep)
        values = values - freq * count - pres * (count > 0).to(values.dtype)
        logits[rows, tokens] = values

    def run(self) -> list[SequenceSample]:
        params, device = self.params, self.device
        num_seqs = len(params)
        processed = self.process()
        greedy_seq = torch.tensor([p.greedy for p in params], device=device)
        any_random = not bool(greedy_seq.all())
        if self.compact is not None and not any(self.num_drafts):
            out = self._draw_compact(greedy_seq, any_random)
            if any(p.logprobs for p in params):
                self._fill_logprobs(out, processed)
            return out
        probs = processed.softmax(dim=-1) if any_random else None
        # [rows]; sampled rows without drafts need it only where a draw lands on nothing (rare).
        need_argmax = any(p.greedy for p in params) or any(self.num_drafts)
        argmax = processed.argmax(dim=-1) if need_argmax else None
        gens = self._seeded_generators()

        # Drafts: accept in order (greedy: draft == argmax; sampling: u < p(draft)).
        max_d = max(self.num_drafts)
        accepted = torch.zeros(num_seqs, dtype=torch.long, device=device)
        if max_d:
            seq_of, pos_of, rows_of, tokens = [], [], [], []
            for s, d in enumerate(self.drafts):
                seq_of += [s] * len(d)
                pos_of += range(len(d))
                rows_of += range(self.offsets[s], self.offsets[s] + len(d))
                tokens += d
            seq_t = torch.tensor(seq_of, device=device)
            rows_t = torch.tensor(rows_of, device=device)
            tokens_t = torch.tensor(tokens, device=device)
            ok = argmax[rows_t] == tokens_t  # type: ignore[index]
            if probs is not None:
                u = self._uniforms(len(tokens), gens)
                ok = torch.where(greedy_seq[seq_t], ok, u < probs[rows_t, tokens_t])
            table = torch.zeros(num_seqs, max_d, dtype=torch.long, device=device)
            table[seq_t, torch.tensor(pos_of, device=device)] = ok.long()
            accepted = table.cumprod(dim=1).sum(dim=1)

        # One more token per sequence, from the row after its accepted drafts.
        accepted_list = accepted.tolist()
        final_rows = torch.tensor(
            [o + a for o, a in zip(self.offsets, accepted_list, strict=True)], device=device
        )
        final = argmax[final_rows] if argmax is not None else None
        if probs is not None:
            p = probs[final_rows]  # [seqs, vocab]
            # A rejected draft's mass is removed; argmax(p / q) needs no renormalization.
            rejected = [s for s, a in enumerate(accepted_list) if a < self.num_drafts[s]]
            if rejected:
                tokens = [self.drafts[s][accepted_list[s]] for s in rejected]
                p[torch.tensor(rejected, device=device), torch.tensor(tokens, device=device)] = 0.0
            drawn = _inverse_cdf(p, self._final_uniforms(num_seqs, gens), final)
            final = drawn if final is None else torch.where(greedy_seq, final, drawn)

        final_list = final.tolist()
        out = [
            SequenceSample(list(self.drafts[s][: accepted_list[s]]) + [final_list[s]], accepted_list[s])
            for s in range(num_seqs)
        ]
        if any(p.logprobs for p in params):
            self._fill_logprobs(out, processed)
        return out

    def _draw_compact(self, greedy_seq: torch.Tensor, any_random: bool) -> list[SequenceSample]:
        """One token per sequence from its top_k candidates (no drafts): the inverse CDF over them in
        vocabulary order, as over the whole row (up to float rounding)."""
        values, ids = self.compact  # type: ignore[misc]
        final = ids[:, 0]  # the best candidate: greedy's token
        if any_random:
            order = ids.argsort(dim=1)
            weights = (values.gather(1, order) - values[:, :1]).exp()  # filtered: 0
            u = self._final_uniforms(len(self.params), self._seeded_generators())
            column = _inverse_cdf(weights, u, None)
            drawn = ids.gather(1, order).gather(1, column.unsqueeze(1)).squeeze(1)
            final = torch.where(greedy_seq, final, drawn)
        return [SequenceSample([t]) for t in final.tolist()]

    def _seeded_generators(self) -> dict[int, torch.Generator]:
        """A fresh generator per seeded sequence, derived from (seed, context_len)."""
        gens = {}
        for s, p in enumerate(self.params):
            if p.seed is not None and not p.greedy:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(seeded_generator_seed(p.seed, int(self.context_lens[s])))
                gens[s] = gen
        return gens

    def _uniforms(self, n: int, gens: dict[int, torch.Generator]) -> torch.Tensor:
        """U[0, 1) per draft row: seeded sequences draw theirs first from their own generator."""
        u = torch.rand(n, device=self.device, generator=self.sampler.generator(self.device))
        start = 0
        for s, d in enumerate(self.num_drafts):
            if s in gens and d:
                u[start : start + d] = torch.rand(d, device=self.device, generator=gens[s])
            start += d
        return u

    def _final_uniforms(self, n: int, gens: dict[int, torch.Generator]) -> torch.Tensor:
        """U[0, 1) per sequence for its last token; a seeded one continues its own generator."""
        u = torch.rand(n, device=self.device, generator=self.sampler.generator(self.device))
        for s, gen in gens.items():
            u[s] = torch.rand(1, device=self.device, generator=gen)[0]
        return u

    def _fill_logprobs(self, out: list[SequenceSample], processed: torch.Tensor) -> None:
        """The chosen token's logprob and rank and the top-n of each emitted token's row."""
        emit_rows, emit_tokens, owners = [], [], []
        for s, sample in enumerate(out):
            if self.params[s].logprobs:
                for j, token in enumerate(sample.token_ids):
                    emit_rows.append(self.offsets[s] + j)
                    emit_tokens.append(token)
                    owners.append(s)
        rows_t = torch.tensor(emit_rows, device=self.device)
        source = processed if self.processed_logprobs else self.raw
        logprobs = source[rows_t].log_softmax(dim=-1)  # [emitted, vocab]
        chosen = logprobs.gather(1, torch.tensor(emit_tokens, device=self.device).unsqueeze(1))
        ranks = torch.count_nonzero(logprobs > chosen, dim=1) + 1
        n = max(self.params[s].logprobs for s in owners)
        top_values, top_ids = fast_topk(logprobs, min(n, logprobs.shape[1]))
        chosen_l, ranks_l = chosen.squeeze(1).tolist(), ranks.tolist()
        top_values_l, top_ids_l = top_values.tolist(), top_ids.tolist()
        for i, s in enumerate(owners):
            k = self.params[s].logprobs
            out[s].logprobs.append(
                TokenLogprob(emit_tokens[i], chosen_l[i], ranks_l[i], top_ids_l[i][:k], top_values_l[i][:k])
            )


__all__ = [
    "GREEDY",
    "MAX_LOGPROBS",
    "SamplingParams",
    "Sampler",
    "SequenceSample",
    "TokenLogprob",
    "apply_frequency_presence",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k_top_p",
    "fast_topk",
    "process_logits",
    "seeded_generator_seed",
    "verification_rows",
]
