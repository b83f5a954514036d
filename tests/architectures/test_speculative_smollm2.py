"""Real weights: greedy speculative decoding with an n-gram (prompt lookup) proposer, verified by
the worker's sampler over forward_paged, is token-for-token plain greedy over 64 tokens of SmolLM2."""

from __future__ import annotations

import pytest
import torch

from architectures import llama
from architectures.sampling import Sampler, SamplingParams, verification_rows
from examples.continuous_batching import DEFAULT_PROMPTS, propose_ngram
from registry import KvCacheOptions, LoadOptions
from tests.real_model import smollm2_hf_dir

pytestmark = pytest.mark.slow

BLOCK = 16
NEW = 64
# "A short list of facts about the planets ... Mercury is", written twice: a repetitive prompt.
PROMPT = DEFAULT_PROMPTS[0] * 2


@pytest.fixture(scope="module")
def model():
    options = LoadOptions(kv_cache=KvCacheOptions(block_size=BLOCK, num_blocks=16))
    return llama.build(smollm2_hf_dir(), torch.device("cpu"), options)


def step(model, tokens: list[int], start: int, num_drafts: int) -> torch.Tensor:
    """Write tokens at positions [start, start + len) of the one sequence (blocks 0..15) and return
    the logits of its last num_drafts + 1 positions."""
    n = len(tokens)
    positions = torch.arange(start, start + n)
    logits = model.forward_paged(
        torch.tensor(tokens),
        positions,
        [list(range(16))],
        positions.clone(),  # block i holds positions [16 i, 16 i + 16): slot = position
        [start + n],
        True,
        [n],
        all_logits=True,
    )
    return logits[verification_rows([n], [num_drafts])]


def test_speculative_greedy_equals_plain_greedy(model) -> None:
    sampler = Sampler(seed=0)
    greedy = [SamplingParams()]
    plain = [int(step(model, PROMPT, 0, 0)[0].argmax())]
    while len(plain) < NEW:
        plain.append(int(step(model, plain[-1:], len(PROMPT) + len(plain) - 1, 0)[0].argmax()))

    out = sampler.sample(step(model, PROMPT, 0, 0), greedy, [len(PROMPT)])[0].token_ids
    calls = proposed = accepted = 0
    while len(out) < NEW:
        context = PROMPT + out
        drafts = propose_ngram(context, min(4, NEW - len(out) - 1))
        logits = step(model, [out[-1], *drafts], len(context) - 1, len(drafts))
        (sample,) = sampler.sample(logits, greedy, [len(context) + len(drafts)], [drafts])
        out += sample.token_ids
        calls += 1
        proposed += len(drafts)
        accepted += sample.num_accepted_drafts
    assert out == plain
    assert accepted > 0 and calls < NEW - 1, (calls, proposed, accepted)
