"""Sampling through both clients: params, seeds, logprobs and draft verification come back as
SequenceOutput, and the sync and asyncio twins send the same request."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.worker.harness import RunningServer
from worker.client import (
    AsyncModelWorkerClient,
    InvalidArgumentError,
    KvCacheConfig,
    ModelWorkerClient,
    SamplingParams,
)

KV = KvCacheConfig(block_size=4, num_blocks=16, max_seq_len=64, max_batch_size=2)
PROMPT = [3, 14, 15, 92, 65]
SAMPLED = SamplingParams(temperature=0.9, top_k=30, top_p=0.9, seed=7, logprobs=3)


@pytest.fixture(scope="module")
def sampled(worker: RunningServer) -> RunningServer:
    with ModelWorkerClient(worker.target, timeout=60) as c:
        c.load("s", "llama", kv_cache=KV)
    return worker


def paged_args(tokens: list[int], first_slot: int = 0) -> tuple:
    n = len(tokens)
    blocks = [first_slot // 4 + b for b in range(-(-n // 4))]
    return tokens, list(range(n)), [blocks], [first_slot + i for i in range(n)], [n]


def test_sync_and_async_clients_sample_alike(sampled: RunningServer) -> None:
    with ModelWorkerClient(sampled.target, timeout=30) as c:
        sync = c.forward_paged(
            "s", *paged_args(PROMPT), is_prefill=True, sampling=SAMPLED, logprobs_mode="processed"
        )
        dense = c.forward("s", [PROMPT, PROMPT], sampling=[SAMPLED, SamplingParams()], logits_mode="none")
        greedy = c.forward("s", PROMPT)

    async def call():
        async with AsyncModelWorkerClient(sampled.target, timeout=30) as c:
            return await c.forward_paged(
                "s", *paged_args(PROMPT, 8), is_prefill=True, sampling=[SAMPLED], logprobs_mode="processed"
            )

    agen = asyncio.run(call())
    (out,) = sync.outputs
    assert out.token_ids == agen.outputs[0].token_ids == sync.next_token_ids
    assert out.num_accepted_drafts == 0
    (lp,) = out.logprobs
    assert lp == agen.outputs[0].logprobs[0] and lp.token_id == out.token_ids[0]
    assert len(lp.top_token_ids) == 3 and lp.rank >= 1 and lp.logprob <= 0
    # Forward: one SamplingParams per row; the greedy row takes the argmax (no logits travel).
    assert [o.token_ids for o in dense.outputs][0] == out.token_ids  # same seed and context
    assert dense.outputs[1].token_ids == [int(np.argmax(greedy.logits[0]))]


def test_verification_and_bad_input_through_the_client(sampled: RunningServer) -> None:
    with ModelWorkerClient(sampled.target, timeout=30) as c:
        first = c.forward_paged("s", *paged_args(PROMPT, 16), is_prefill=True).next_token_ids[0]
        greedy = [first]
        for _ in range(2):
            greedy.append(c.forward("s", PROMPT + greedy).next_token_ids[0])
        n = len(PROMPT)
        tokens = [first, greedy[1], (greedy[2] + 1) % 128]
        out = c.forward_paged(
            "s",
            tokens,
            list(range(n, n + 3)),
            [[4, 5]],
            [16 + n + i for i in range(3)],
            [n + 3],
            is_prefill=True,
            query_lens=[3],
            num_draft_tokens=[2],
        ).outputs[0]
        assert out.num_accepted_drafts == 1 and out.token_ids == greedy[1:3]
        with pytest.raises(InvalidArgumentError, match=r"sampling\[0\].top_p = 1.5"):
            c.forward_paged("s", *paged_args(PROMPT, 16), is_prefill=True, sampling=SamplingParams(top_p=1.5))
        with pytest.raises(ValueError, match="logprobs_mode"):
            c.forward("s", PROMPT, logprobs_mode="cooked")  # type: ignore[arg-type]
