"""The worker's sampler against independent references: transformers' logits processors, the
OpenAI penalty formula, chi-square over batched draws, seeds, and speculative verification."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from architectures.sampling import Sampler, SamplingParams, fast_topk, process_logits

VOCAB = 64


def hf_processed(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row [vocab] through transformers' processors in vLLM's order."""
    scores = logits.clone().unsqueeze(0)
    seen = torch.tensor([list(p.prompt_token_ids) + list(p.output_token_ids)])
    if p.repetition_penalty not in (0.0, 1.0):
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(seen, scores)
    if p.temperature > 0:
        scores = TemperatureLogitsWarper(p.temperature)(seen, scores)
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(seen, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(seen, scores)
    if 0 < p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(seen, scores)
    return scores[0]


def random_params(gen: torch.Generator, n: int) -> list[SamplingParams]:
    """A mix: every transform alone, all together, and some rows with none."""

    def r(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    def ids(k: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, VOCAB, (k,), generator=gen).tolist())

    out = []
    for i in range(n):
        kind = i % 7
        out.append(
            SamplingParams(
                temperature=r(0.3, 2.0) if kind in (0, 5) else (0.0 if kind == 6 else 1.0),
                top_k=int(torch.randint(1, VOCAB, (), generator=gen)) if kind in (1, 5) else 0,
                top_p=r(0.2, 0.95) if kind in (2, 5) else 1.0,
                min_p=r(0.01, 0.3) if kind in (3, 5) else 0.0,
                repetition_penalty=r(1.05, 2.0) if kind in (4, 5) else 1.0,
                prompt_token_ids=ids(10),
                output_token_ids=ids(6),
            )
        )
    return out


def test_each_transform_matches_transformers_processors(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(28, VOCAB, generator=gen) * 3
    params = random_params(gen, 28)
    ours = process_logits(logits, params)
    for row, p in enumerate(params):
        ref = hf_processed(logits[row], p)
        kept = torch.isfinite(ref)
        assert torch.equal(kept, torch.isfinite(ours[row])), f"seed {seed} row {row} {p}"
        torch.testing.assert_close(
            ours[row].log_softmax(-1)[kept], ref.log_softmax(-1)[kept], msg=f"seed {seed} row {row}"
        )


def test_top_p_among_a_small_top_k_matches_transformers(seed: int) -> None:
    """Every row with a small top_k: top_p runs over the top_k candidates only (no full sort)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, VOCAB, generator=gen) * 2
    params = [
        SamplingParams(
            temperature=0.5 + float(torch.rand((), generator=gen)),
            top_k=int(torch.randint(1, VOCAB // 4, (), generator=gen)),
            top_p=0.3 + 0.6 * float(torch.rand((), generator=gen)),
        )
        for _ in range(12)
    ]
    ours = process_logits(logits, params)
    for row, p in enumerate(params):
        ref = hf_processed(logits[row], p)
        assert torch.equal(torch.isfinite(ref), torch.isfinite(ours[row])), f"seed {seed} row {row} {p}"
        kept = torch.isfinite(ref)
        torch.testing.assert_close(ours[row].log_softmax(-1)[kept], ref.log_softmax(-1)[kept])


def test_frequency_and_presence_follow_the_openai_formula(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, VOCAB, generator=gen)
    params = []
    for _ in range(4):
        outputs = torch.randint(0, 8, (20,), generator=gen).tolist()  # repeats: counts > 1
        prompt = torch.randint(0, VOCAB, (5,), generator=gen).tolist()  # the prompt does not count
        freq, pres = float(torch.rand((), generator=gen)) * 2, float(torch.rand((), generator=gen)) * 2 - 1
        params.append(
            SamplingParams(
                frequency_penalty=freq,
                presence_penalty=pres,
                output_token_ids=tuple(outputs),
                prompt_token_ids=tuple(prompt),
            )
        )
    ours = process_logits(logits, params)
    for row, p in enumerate(params):
        expected = logits[row].clone()
        for token in set(p.output_token_ids):
            count = p.output_token_ids.count(token)
            expected[token] -= p.frequency_penalty * count + p.presence_penalty
        torch.testing.assert_close(ours[row], expected)


def chi_square_limit(dof: int, z: float = 3.719) -> float:
    """Wilson-Hilferty quantile of chi-square (z = 3.719: p = 1e-4)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


MIXES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=12),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(
        temperature=0.9,
        top_k=20,
        top_p=0.9,
        min_p=0.02,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.3,
        prompt_token_ids=(1, 2, 3),
        output_token_ids=(3, 3, 7),
    ),
]


@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_draws_follow_the_processed_distribution(mix: int) -> None:
    n = 20_000
    logits = torch.randn(1, 32, generator=torch.Generator().manual_seed(100 + mix))
    params = MIXES[mix]
    probs = process_logits(logits, [params]).softmax(-1)[0]
    out = Sampler(seed=7 + mix).sample(logits.expand(n, 32), [params] * n, [5] * n)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in out]), minlength=32).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a filtered token was drawn"
    expected = probs[support].double() * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert dof >= 2 and stat < chi_square_limit(dof), (stat, dof)


def test_greedy_takes_the_argmax_after_penalties() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    plain = Sampler(seed=1).sample(logits, [SamplingParams()], [1])
    penalized = Sampler(seed=1).sample(
        logits, [SamplingParams(repetition_penalty=2.0, output_token_ids=(1,))], [1]
    )
    assert plain[0].token_ids == [1] and penalized[0].token_ids == [2]


def test_seeded_sequence_draws_the_same_alone_batched_and_reordered(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 200, generator=gen)
    params = [SamplingParams(temperature=1.5, top_p=0.95, seed=1000 + i) for i in range(8)]
    context = [17 + i for i in range(8)]
    alone = [Sampler().sample(logits[i : i + 1], [params[i]], [context[i]])[0].token_ids for i in range(8)]
    batched = [o.token_ids for o in Sampler().sample(logits, params, context)]
    order = torch.randperm(8, generator=gen).tolist()
    shuffled = Sampler().sample(logits[order], [params[i] for i in order], [context[i] for i in order])
    reordered = [None] * 8
    for pos, i in enumerate(order):
        reordered[i] = shuffled[pos].token_ids
    assert alone == batched == reordered
    # Mixed with unseeded sequences, the seeded one still draws the same.
    mixed = Sampler().sample(
        torch.cat([logits[3:4], logits]),
        [params[3], *[SamplingParams(temperature=1.0)] * 8],
        [context[3]] + context,
    )
    assert mixed[0].token_ids == alone[3]
    # The next step (another context_len) draws from another stream.
    later = [Sampler().sample(logits[:1], [params[0]], [c])[0].token_ids[0] for c in range(30, 60)]
    assert len(set(later)) > 5


def test_unseeded_batches_differ_across_calls() -> None:
    sampler = Sampler()
    logits = torch.zeros(64, 1000)  # uniform: two equal batches of 64 draws are ~impossible
    params = [SamplingParams(temperature=1.0)] * 64
    first = [o.token_ids[0] for o in sampler.sample(logits, params, [3] * 64)]
    second = [o.token_ids[0] for o in sampler.sample(logits, params, [3] * 64)]
    assert first != second
    assert len(set(first)) > 32


def test_logprobs_raw_and_processed() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 40, generator=gen)
    params = [SamplingParams(temperature=0.5, top_k=5, logprobs=3, seed=1), SamplingParams(logprobs=0)]
    for processed in (False, True):
        out = Sampler().sample(logits, params, [9, 9], processed_logprobs=processed)
        assert out[1].logprobs == []
        (lp,) = out[0].logprobs
        ref = (process_logits(logits, params) if processed else logits).log_softmax(-1)[0]
        assert lp.token_id == out[0].token_ids[0]
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-5)
        assert lp.rank == int((ref > ref[lp.token_id]).sum()) + 1
        values, ids = ref.topk(3)
        assert lp.top_token_ids == ids.tolist()
        assert lp.top_logprobs == pytest.approx(values.tolist(), abs=1e-5)


def test_greedy_verification_accepts_while_drafts_match() -> None:
    # Three sequences with 3, 0 and 2 drafts: 4 + 1 + 3 rows.
    logits = torch.full((8, 10), -5.0)
    targets = [4, 5, 6, 7, 1, 2, 3, 9]
    logits[torch.arange(8), torch.tensor(targets)] = 5.0
    drafts = [[4, 5, 0], [], [2, 3]]
    out = Sampler().sample(logits, [SamplingParams()] * 3, [10, 10, 10], drafts)
    assert [o.token_ids for o in out] == [[4, 5, 6], [1], [2, 3, 9]]
    assert [o.num_accepted_drafts for o in out] == [2, 0, 2]


def test_sampling_verification_output_follows_the_target() -> None:
    """Deterministic drafts (p0's likeliest token, then p1's second likeliest): the first emitted token
    follows p0, and after the first draft is accepted the next one follows p1 (total-variation
    distance < 0.01 over 50k trials)."""
    n, vocab = 50_000, 6
    target = torch.randn(3, vocab, generator=torch.Generator().manual_seed(11)) * 1.5
    p = target.softmax(-1).double()
    drafts = [int(p[0].argmax()), int(p[1].topk(2).indices[1])]
    logits = target.repeat(n, 1)  # rows of sequence s: 3s, 3s + 1, 3s + 2
    params = [SamplingParams(temperature=1.0)] * n
    out = Sampler(seed=5).sample(logits, params, [40] * n, [drafts] * n)
    first = torch.bincount(torch.tensor([o.token_ids[0] for o in out]), minlength=vocab).double() / n
    assert 0.5 * float((first - p[0]).abs().sum()) < 0.01
    after = [o.token_ids[1] for o in out if o.token_ids[0] == drafts[0]]
    second = torch.bincount(torch.tensor(after), minlength=vocab).double() / len(after)
    assert len(after) > 5000 and 0.5 * float((second - p[1]).abs().sum()) < 0.02
    assert all(o.num_accepted_drafts == len(o.token_ids) - 1 for o in out)
    assert all(o.token_ids[: o.num_accepted_drafts] == drafts[: o.num_accepted_drafts] for o in out)


def test_penalties_of_a_draft_row_count_the_drafts_before_it(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, VOCAB, generator=gen)
    drafts = [5, 6, 5]
    p = SamplingParams(
        repetition_penalty=1.4,
        frequency_penalty=0.7,
        presence_penalty=0.3,
        output_token_ids=(6, 9),
        prompt_token_ids=(1,),
    )
    together = process_logits(logits, [p], [drafts])
    for j in range(4):
        alone = SamplingParams(**{**p.__dict__, "output_token_ids": p.output_token_ids + tuple(drafts[:j])})
        torch.testing.assert_close(together[j], process_logits(logits[j : j + 1], [alone])[0])


@pytest.mark.parametrize("k", [1, 5, 50])
def test_fast_topk_equals_torch_topk(seed: int, k: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 49152, generator=gen)
    x[1, 1000:1100] += 8.0  # a cluster of large values in one chunk
    x[2, torch.randperm(49152, generator=gen)[:40000]] = float("-inf")  # min_p left few finite
    x[3] = float("-inf")
    x[3, :3] = 1.0  # fewer finite entries than k: the fallback
    values, ids = fast_topk(x, k)
    want_values, want_ids = x.topk(k, dim=-1)
    assert torch.equal(values, want_values)
    finite = torch.isfinite(want_values)
    assert torch.equal(ids[finite], want_ids[finite])


def test_draws_among_a_small_top_k_follow_the_distribution_and_seeds() -> None:
    """Every row with a small top_k: the draw runs over the candidates only; same distribution, and
    a seeded sequence still draws the same alone and batched."""
    n, vocab = 20_000, 256
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(21)) * 2
    params = SamplingParams(temperature=0.8, top_k=16, top_p=0.9, min_p=0.01)
    probs = process_logits(logits, [params]).softmax(-1)[0]
    out = Sampler(seed=3).sample(logits.expand(n, vocab), [params] * n, [5] * n)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in out]), minlength=vocab).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    expected = probs[support].double() * n
    dof = int(support.sum()) - 1
    assert dof >= 2 and float(((counts[support] - expected) ** 2 / expected).sum()) < chi_square_limit(dof)
    rows = torch.randn(8, vocab, generator=torch.Generator().manual_seed(22))
    seeded = [SamplingParams(temperature=1.0, top_k=30, seed=i) for i in range(8)]
    alone = [Sampler().sample(rows[i : i + 1], [seeded[i]], [9])[0].token_ids for i in range(8)]
    assert [o.token_ids for o in Sampler().sample(rows, seeded, [9] * 8)] == alone
