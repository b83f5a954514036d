"""Sampling, logprobs and speculative verification through a real server on loopback, and every bad
sampling input: INVALID_ARGUMENT naming the field and the sequence, with the cache left as it was."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
import torch

from architectures.sampling import Sampler, SamplingParams
from worker.pb.modelworker.v1 import worker_pb2 as pb
from worker.tensors import decode_tensor

from .harness import RunningServer, load_request, rpc_error

BLOCK = 16  # SMALL_KV's block size
PROMPT = [5, 17, 42, 9, 77, 3, 12]


@pytest.fixture(scope="module")
def stub(worker: RunningServer):
    s = worker.stub()
    s.Load(load_request("sampled", "llama-a"))
    yield s
    s.Unload(pb.UnloadRequest(model_id="sampled"))


def prefill(tokens: list[int], block: int, **kwargs) -> pb.ForwardPagedRequest:
    """One sequence of len(tokens) <= 16 tokens in `block`, all of them new."""
    n = len(tokens)
    return pb.ForwardPagedRequest(
        model_id="sampled",
        input_tokens=tokens,
        positions=list(range(n)),
        block_tables=[pb.BlockTable(block_ids=[block])],
        slot_mapping=[block * BLOCK + i for i in range(n)],
        context_lens=[n],
        query_lens=[n],
        is_prefill=True,
        **kwargs,
    )


def batch(prompts: list[list[int]], first_block: int, **kwargs) -> pb.ForwardPagedRequest:
    """Several sequences, one block each from first_block on, prefilled in one call."""
    request = pb.ForwardPagedRequest(model_id="sampled", is_prefill=True, **kwargs)
    for s, tokens in enumerate(prompts):
        block = first_block + s
        request.input_tokens.extend(tokens)
        request.positions.extend(range(len(tokens)))
        request.block_tables.add(block_ids=[block])
        request.slot_mapping.extend(block * BLOCK + i for i in range(len(tokens)))
        request.context_lens.append(len(tokens))
        request.query_lens.append(len(tokens))
    return request


def greedy_continuation(stub, tokens: list[int], steps: int) -> list[int]:
    """Plain greedy through stateless Forward (an independent path: no paged cache)."""
    out = list(tokens)
    for _ in range(steps):
        out.append(stub.Forward(pb.ForwardRequest(model_id="sampled", token_ids=out)).next_token_ids[0])
    return out[len(tokens) :]


def test_no_sampling_fills_outputs_with_the_argmax(stub) -> None:
    reply = stub.ForwardPaged(batch([PROMPT, PROMPT[:4]], first_block=0))
    logits = decode_tensor(reply.logits)
    assert list(reply.next_token_ids) == logits.argmax(-1).tolist()
    assert [list(o.token_ids) for o in reply.outputs] == [[t] for t in reply.next_token_ids]
    assert all(o.num_accepted_drafts == 0 and not o.logprobs for o in reply.outputs)


def test_sampled_forward_paged_draws_from_the_returned_logits(stub) -> None:
    prompts = [PROMPT, PROMPT[:5], PROMPT[2:]]
    params = [
        pb.SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11, logprobs=4),
        pb.SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5, prompt_token_ids=PROMPT[:5]),
        pb.SamplingParams(temperature=1.2, min_p=0.01, seed=12),
    ]
    reply = stub.ForwardPaged(batch(prompts, first_block=4, sampling=params))
    logits = decode_tensor(reply.logits)
    expected = Sampler().sample(
        logits,
        [
            SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=11, logprobs=4),
            SamplingParams(logprobs=2, repetition_penalty=1.5, prompt_token_ids=tuple(PROMPT[:5])),
            SamplingParams(temperature=1.2, min_p=0.01, seed=12),
        ],
        [len(p) for p in prompts],
    )
    assert [list(o.token_ids) for o in reply.outputs] == [e.token_ids for e in expected]
    assert list(reply.next_token_ids) == [e.token_ids[-1] for e in expected]
    raw = logits.log_softmax(-1)
    for s, n in ((0, 4), (1, 2)):
        (lp,) = reply.outputs[s].logprobs
        assert lp.token_id == reply.outputs[s].token_ids[0]
        assert lp.logprob == pytest.approx(float(raw[s, lp.token_id]), abs=1e-5)
        assert list(lp.top_token_ids) == raw[s].topk(n).indices.tolist()
        assert lp.rank == int((raw[s] > raw[s, lp.token_id]).sum()) + 1
    assert not reply.outputs[2].logprobs
    # The same seeded sequence alone, in another call: the same token.
    alone = stub.ForwardPaged(prefill(PROMPT, 12, sampling=[params[0]]))
    assert list(alone.outputs[0].token_ids) == list(reply.outputs[0].token_ids)


def test_processed_logprobs_mark_filtered_tokens(stub) -> None:
    sampling = [pb.SamplingParams(temperature=1.0, top_k=3, logprobs=5, seed=1)]
    reply = stub.ForwardPaged(prefill(PROMPT, 13, sampling=sampling, logprobs_mode=pb.LOGPROBS_PROCESSED))
    (lp,) = reply.outputs[0].logprobs
    assert lp.top_logprobs[3] == float("-inf") and lp.top_logprobs[4] == float("-inf")
    assert sum(torch.tensor(list(lp.top_logprobs[:3])).exp().tolist()) == pytest.approx(1.0, abs=1e-5)


def test_sampled_forward_per_batch_row(stub) -> None:
    rows = [PROMPT[:4], PROMPT[3:]]
    sampling = [pb.SamplingParams(temperature=1.0, seed=3, logprobs=1), pb.SamplingParams()]
    reply = stub.Forward(
        pb.ForwardRequest(model_id="sampled", token_ids=rows[0] + rows[1], batch_size=2, sampling=sampling)
    )
    logits = decode_tensor(reply.logits)
    expected = Sampler().sample(
        logits, [SamplingParams(temperature=1.0, seed=3, logprobs=1), SamplingParams()], [4, 4]
    )
    assert [list(o.token_ids) for o in reply.outputs] == [e.token_ids for e in expected]
    assert len(reply.outputs[0].logprobs) == 1 and not reply.outputs[1].logprobs


@pytest.mark.parametrize("mode", [pb.LOGITS_LAST, pb.LOGITS_ALL])
def test_greedy_verification_emits_the_greedy_continuation(stub, mode: int) -> None:
    block = 14 if mode == pb.LOGITS_LAST else 15
    reference = greedy_continuation(stub, PROMPT, 4)
    first = stub.ForwardPaged(prefill(PROMPT, block))
    assert first.next_token_ids[0] == reference[0]
    # Query: the last emitted token, then drafts: two right ones and a wrong one.
    wrong = (reference[3] + 1) % 128
    drafts = [reference[1], reference[2], wrong]
    tokens = [reference[0], *drafts]
    start = len(PROMPT)
    reply = stub.ForwardPaged(
        pb.ForwardPagedRequest(
            model_id="sampled",
            input_tokens=tokens,
            positions=list(range(start, start + 4)),
            block_tables=[pb.BlockTable(block_ids=[block])],
            slot_mapping=[block * BLOCK + start + i for i in range(4)],
            context_lens=[start + 4],
            query_lens=[4],
            is_prefill=True,
            num_draft_tokens=[3],
            logits_mode=mode,
        )
    )
    # The logits of the last query position (LOGITS_LAST) or of all four (LOGITS_ALL), as asked.
    logits = decode_tensor(reply.logits)
    assert logits.shape == ((1, 128) if mode == pb.LOGITS_LAST else (4, 128))
    dense = stub.Forward(pb.ForwardRequest(model_id="sampled", token_ids=PROMPT + tokens))
    torch.testing.assert_close(logits[-1], decode_tensor(dense.logits)[0], atol=1e-4, rtol=1e-4)
    out = reply.outputs[0]
    assert out.num_accepted_drafts == 2
    assert list(out.token_ids) == reference[1:4]
    assert reply.next_token_ids[0] == reference[3]


def bad_cases() -> list[tuple[str, Callable[[pb.ForwardPagedRequest], None], tuple[str, ...]]]:
    def sampling(**kw) -> Callable[[pb.ForwardPagedRequest], None]:
        def edit(r: pb.ForwardPagedRequest) -> None:
            r.sampling.add()
            r.sampling.add(**kw)

        return edit

    return [
        ("count", lambda r: [r.sampling.add() for _ in range(3)], ("len(sampling) = 3", "per sequence (2)")),
        ("temperature", sampling(temperature=-0.5), ("sampling[1].temperature = -0.5", "sequence 1")),
        ("top_p", sampling(top_p=1.5), ("sampling[1].top_p = 1.5", "[0, 1]", "sequence 1")),
        ("min_p", sampling(min_p=-0.1), ("sampling[1].min_p", "sequence 1")),
        ("logprobs", sampling(logprobs=21), ("sampling[1].logprobs = 21", "maximum of 20", "sequence 1")),
        ("penalty", sampling(presence_penalty=3), ("sampling[1].presence_penalty = 3", "sequence 1")),
        ("repetition", sampling(repetition_penalty=-1), ("sampling[1].repetition_penalty", "sequence 1")),
        (
            "vocab",
            sampling(output_token_ids=[1, 128]),
            ("sampling[1].output_token_ids[1] = 128", "vocabulary of 128", "sequence 1"),
        ),
        (
            "negative id",
            sampling(prompt_token_ids=[-3]),
            ("sampling[1].prompt_token_ids[0] = -3", "sequence 1"),
        ),
        (
            "drafts",
            lambda r: r.num_draft_tokens.extend([0, 4]),
            ("num_draft_tokens[1] = 4", "query_len - 1 = 3"),
        ),
        (
            "negative drafts",
            lambda r: r.num_draft_tokens.extend([-1, 0]),
            ("num_draft_tokens[0] = -1", "sequence 0"),
        ),
        (
            "draft count",
            lambda r: r.num_draft_tokens.extend([1]),
            ("len(num_draft_tokens) = 1", "sequences 2"),
        ),
        ("logprobs_mode", lambda r: setattr(r, "logprobs_mode", 7), ("logprobs_mode 7",)),
    ]


CASES = bad_cases()


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_bad_sampling_input_is_refused_and_changes_nothing(stub, case: int) -> None:
    _, edit, fragments = CASES[case]
    # Sequence 0 holds PROMPT in block 20; a decode step over it is the probe of the cache.
    stub.ForwardPaged(prefill(PROMPT, 20))
    n = len(PROMPT)
    probe = pb.ForwardPagedRequest(
        model_id="sampled",
        input_tokens=[7],
        positions=[n],
        block_tables=[pb.BlockTable(block_ids=[20])],
        slot_mapping=[20 * BLOCK + n],
        context_lens=[n + 1],
    )
    before = decode_tensor(stub.ForwardPaged(probe).logits)
    # The bad call would overwrite block 20 (other tokens) and block 21.
    bad = batch([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12]], first_block=20)
    edit(bad)
    err = rpc_error(lambda: stub.ForwardPaged(bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    for fragment in fragments:
        assert fragment in err.details(), (fragment, err.details())
    assert torch.equal(decode_tensor(stub.ForwardPaged(probe).logits), before)


def test_bad_forward_sampling_names_the_batch_row(stub) -> None:
    request = pb.ForwardRequest(model_id="sampled", token_ids=[1, 2, 3, 4], batch_size=2)
    request.sampling.add(top_p=2)
    err = rpc_error(lambda: stub.Forward(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling[0].top_p = 2" in err.details() and "every batch row" in err.details()
    request.sampling.add()
    request.sampling.add()
    err = rpc_error(lambda: stub.Forward(request))
    assert "len(sampling) = 3" in err.details() and "batch row (2)" in err.details()
