"""examples/continuous_batching.py against a real worker: every prompt's tokens equal plain greedy
Forward over the contiguous cache for that prompt alone, while blocks are reused across finished
sequences, a shared prefix is computed once, prompts are prefilled in chunks and sequences are
preempted and recomputed."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from examples import continuous_batching as cb
from tests.worker.harness import RunningServer, make_settings, start_server
from worker.client import KvCacheConfig, ModelWorkerClient

BLOCK = 4


def greedy_reference(client: ModelWorkerClient, model_id: str, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy generation of one prompt alone with Forward over the contiguous cache."""
    client.reset_cache(model_id)
    out = client.forward(model_id, list(prompt), use_cache=True, start_pos=0, logits_mode="none")
    tokens = [out.next_token_ids[0]]
    while len(tokens) < n:
        start = len(prompt) + len(tokens) - 1
        out = client.forward(model_id, [tokens[-1]], use_cache=True, start_pos=start, logits_mode="none")
        tokens.append(out.next_token_ids[0])
    return tokens


def assert_matches_reference(
    client: ModelWorkerClient, model_id: str, prompts: list[list[int]], new: list[int], result: cb.RunResult
) -> None:
    assert len(result.outputs) == len(prompts)
    for i, (prompt, n, got) in enumerate(zip(prompts, new, result.outputs, strict=True)):
        want = greedy_reference(client, model_id, prompt, n)
        assert got == want, f"prompt {i} ({len(prompt)} tokens): batched {got} != alone {want}"
    assert result.stats.generated_tokens == sum(new)


def record_calls(client: ModelWorkerClient) -> list[dict]:
    """Wrap the client's forward_paged to record each call's block tables, context and query lengths
    (the call itself still goes to the worker)."""
    calls: list[dict] = []
    original = client.forward_paged

    def recording(model_id, input_tokens, positions, block_tables, slot_mapping, context_lens, **kwargs):
        calls.append(dict(block_tables=block_tables, context_lens=context_lens, **kwargs))
        return original(model_id, input_tokens, positions, block_tables, slot_mapping, context_lens, **kwargs)

    client.forward_paged = recording  # type: ignore[method-assign]
    return calls


@pytest.fixture(scope="module")
def paged(worker: RunningServer) -> RunningServer:
    with ModelWorkerClient(worker.target, timeout=60) as c:
        c.load("cb", "llama", kv_cache=KvCacheConfig(block_size=BLOCK, num_blocks=24))
        c.load("cb-qwen", "qwen", kv_cache=KvCacheConfig(block_size=BLOCK, num_blocks=12))
    return worker


def test_matches_greedy_forward_with_reuse_and_a_shared_prefix(paged: RunningServer, client) -> None:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    vocab = 128
    prefix = [rng.randrange(vocab) for _ in range(10)]  # two full blocks of 4, then half of one
    firsts = rng.sample(range(vocab), 3)  # the group's tails differ right after the prefix
    group = [0, 2, 4]
    prompts, new = [], []
    for i in range(9):
        if i in group:
            tail = [firsts[group.index(i)]] + [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
            prompts.append(prefix + tail)
            new.append(rng.randint(10, 12))  # still running when the group's last member arrives
        else:
            prompts.append([rng.randrange(vocab) for _ in range(rng.randint(1, 12))])
            new.append(rng.randint(1, 6))
    # At most 4 running need at most 22 of the 24 blocks: no preemption, so prefill work is exact.
    result = cb.run(client, "cb", prompts, new, max_num_seqs=4, max_batch_tokens=32)
    s = result.stats
    assert_matches_reference(client, "cb", prompts, new, result)

    # Blocks were handed out again after finished sequences freed them; the cache never overflowed.
    demand = sum(-(-(len(p) + n) // BLOCK) for p, n in zip(prompts, new, strict=True))
    assert demand > 24 and s.blocks_reused > 0, (seed, s)
    assert s.peak_blocks_used <= 24 and s.preemptions == 0
    # Prompts were admitted while others decoded, in the same ForwardPaged call.
    assert s.mixed_steps > 0 and s.max_running == 4 and s.decode_steps > 0
    # The prefix's two full blocks were computed once: by the first of the group, shared by the others.
    cached = sorted(result.sequences[i].cached_prompt_tokens for i in group)
    assert cached == [0, 2 * BLOCK, 2 * BLOCK], (seed, cached)
    assert s.prefix_hit_blocks == 4
    assert s.prompt_tokens_computed == s.prompt_tokens - 4 * BLOCK
    others = [r.cached_prompt_tokens for i, r in enumerate(result.sequences) if i not in group]
    assert others == [0] * 6


def test_preemption_and_chunked_prefill_keep_the_tokens(paged: RunningServer, client) -> None:
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    # Four prompts of 8-14 tokens, each growing by 10: at their peak they need 4 x 5 of the 12 blocks.
    prompts = [[rng.randrange(128) for _ in range(n)] for n in (14, rng.randint(8, 10), 9, 8)]
    prompts += [[rng.randrange(128) for _ in range(rng.randint(1, 10))] for _ in range(2)]
    new = [10, 10, 10, 10, rng.randint(1, 8), rng.randint(1, 8)]
    # Prompt 0 is longer than a step's 8 tokens: it is prefilled in two chunks.
    calls = record_calls(client)
    result = cb.run(client, "cb-qwen", prompts, new, max_num_seqs=4, max_batch_tokens=8)
    # Prompt 0's second chunk: its last 6 tokens over a context of 14.
    assert any((6, 14) in zip(c["query_lens"] or (), c["context_lens"], strict=False) for c in calls), calls
    assert_matches_reference(client, "cb-qwen", prompts, new, result)
    s = result.stats
    # 12 blocks cannot hold 4 such sequences: the newest ones were preempted and recomputed.
    assert s.preemptions > 0 and sum(r.preemptions for r in result.sequences) == s.preemptions, (seed, s)
    assert s.prompt_tokens_computed > s.prompt_tokens - s.prefix_hit_blocks * BLOCK
    assert s.peak_blocks_used <= 12 and s.blocks_reused > 0


def test_fewer_blocks_than_the_worker_has(paged: RunningServer, client) -> None:
    """num_blocks limits the scheduler to part of the cache (block ids stay below it)."""
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    calls = record_calls(client)
    result = cb.run(client, "cb", prompts, 6, num_blocks=5, max_num_seqs=2)
    seen = [b for c in calls for table in c["block_tables"] for b in table]
    assert seen and max(seen) < 5 and result.stats.num_blocks == 5
    assert_matches_reference(client, "cb", prompts, [6, 6, 6], result)


def test_run_refuses_what_can_never_fit(paged: RunningServer, client) -> None:
    with pytest.raises(ValueError, match=r"prompt 1: 90 \+ 10 tokens need 25 blocks of 4, the cache has 24"):
        cb.run(client, "cb", [[1, 2], [3] * 90], 10)
    with pytest.raises(
        ValueError, match="40 \\+ 250 tokens reach position 288, beyond max_position_embeddings 256"
    ):
        cb.run(client, "cb", [[1] * 40], 250)
    with pytest.raises(RuntimeError, match="'missing' is not loaded"):
        cb.run(client, "missing", [[1]], 1)
    with pytest.raises(ValueError, match="2 max_new_tokens values for 1 prompts"):
        cb.run(client, "cb", [[1]], [1, 2])
    with pytest.raises(ValueError, match="prompt 0: needs at least one token"):
        cb.run(client, "cb", [[]], 1)
    # The boundary: the last generated token is never stored, so 90 + 7 tokens fill 96 slots exactly.
    prompt = [random.randrange(128) for _ in range(90)]
    result = cb.run(client, "cb", [prompt], 7)
    assert result.stats.peak_blocks_used == 24
    assert_matches_reference(client, "cb", [prompt], [7], result)


def test_script(paged: RunningServer, client, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--address", paged.target, "--model", "cb", "--prompt", "1,2,3,4,5", "--prompt", "9 8", "-n", "5"]
    assert cb.main([*argv, "-v"]) == 0
    out = capsys.readouterr().out
    assert (
        f"prompt 0 (5 tokens, 0 from the prefix cache): {greedy_reference(client, 'cb', [1, 2, 3, 4, 5], 5)}"
        in out
    )
    assert f"prompt 1 (2 tokens, 0 from the prefix cache): {greedy_reference(client, 'cb', [9, 8], 5)}" in out
    assert "step    0: 2 prefill (7 tokens) + 0 decode" in out
    assert "10 tokens in" in out and "tokens/s" in out and "peak" in out
    # Default prompts are SmolLM2 ids; a tiny vocabulary gets random prompts instead.
    assert cb.main(["--address", paged.target, "--model", "cb", "-n", "2"]) == 0
    assert "random prompts" in capsys.readouterr().out
    assert cb.main(["--address", paged.target, "--model", "nope"]) == 1
    assert "'nope' is not loaded" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2(aio_loop, tmp_path: Path) -> None:
    from tests.real_model import smollm2_hf_dir

    model_dir = smollm2_hf_dir()
    running = start_server(aio_loop, make_settings(model_dir.parent, grace_seconds=0.5))
    try:
        with ModelWorkerClient(running.target, timeout=120) as c:
            # 6 blocks of 16 tokens and two seats for 4 sequences of 20-36 tokens: blocks are reused.
            c.load(
                "smollm2",
                model_dir.name,
                dtype="float32",
                kv_cache=KvCacheConfig(block_size=16, num_blocks=6),
            )
            # Three prompts share an 18-token prefix (one full block); "The capital of France is".
            prompts = [cb.DEFAULT_PROMPTS[i] for i in (0, 1, 2, 4)]
            result = cb.run(c, "smollm2", prompts, 16, max_num_seqs=2)
            s = result.stats
            print(f"SmolLM2 continuous batching: {s.tokens_per_second:.1f} tokens/s, {s}")
            assert_matches_reference(c, "smollm2", prompts, [16] * 4, result)
            assert s.blocks_reused > 0 and s.mixed_steps > 0 and s.peak_blocks_used <= 6, s
            cached = [r.cached_prompt_tokens for r in result.sequences]
            assert cached == [0, 16, 16, 0], cached
            assert s.prompt_tokens_computed == s.prompt_tokens - 32
    finally:
        running.stop(grace=0.5)


def test_the_readme_worked_example(paged: RunningServer, client) -> None:
    """README "Driving the worker from a scheduler": the three ForwardPaged calls of its worked
    example (block size 4), checked against greedy Forward of each sequence alone."""
    rng = random.Random()
    a = [rng.randrange(128) for _ in range(6)]
    b = [rng.randrange(128) for _ in range(3)]
    c = a[:4] + [rng.randrange(128) for _ in range(2)]  # shares A's first block
    client.reset_cache("cb")
    # Step 1: prefill A (blocks 2, 5) and B (block 7).
    r1 = client.forward_paged(
        "cb",
        input_tokens=a + b,
        positions=[0, 1, 2, 3, 4, 5, 0, 1, 2],
        block_tables=[[2, 5], [7]],
        slot_mapping=[8, 9, 10, 11, 20, 21, 28, 29, 30],
        context_lens=[6, 3],
        is_prefill=True,
    )
    a6, b3 = r1.next_token_ids
    # Step 2: A and B decode; C is admitted, reusing block 2, prefilling its last 2 tokens into block 9.
    r2 = client.forward_paged(
        "cb",
        input_tokens=[a6, b3, c[4], c[5]],
        positions=[6, 3, 4, 5],
        block_tables=[[2, 5], [7], [2, 9]],
        slot_mapping=[22, 31, 36, 37],
        context_lens=[7, 4, 6],
        query_lens=[1, 1, 2],
        is_prefill=True,
    )
    a7, b4, c6 = r2.next_token_ids
    # Step 3: all three decode; B's fifth token opens its second block, 1.
    r3 = client.forward_paged(
        "cb",
        input_tokens=[a7, b4, c6],
        positions=[7, 4, 6],
        block_tables=[[2, 5], [7, 1], [2, 9]],
        slot_mapping=[23, 4, 38],
        context_lens=[8, 5, 7],
        is_prefill=False,
    )
    assert [a6, a7, r3.next_token_ids[0]] == greedy_reference(client, "cb", a, 3)
    assert [b3, b4, r3.next_token_ids[1]] == greedy_reference(client, "cb", b, 3)
    assert [c6, r3.next_token_ids[2]] == greedy_reference(client, "cb", c, 2)


def test_propose_ngram_looks_up_the_latest_earlier_occurrence() -> None:
    assert cb.propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == [7, 1]  # latest match of [1, 2, 3]
    assert cb.propose_ngram([5, 6, 7, 6], 3) == [7, 6]  # falls back to n = 1
    assert cb.propose_ngram([1, 2, 3], 4) == [] and cb.propose_ngram([4, 4], 0) == []


@pytest.fixture(scope="module")
def fixed(paged: RunningServer, client_model_root: Path) -> str:
    """A tiny Llama with fixed weights (the acceptance of drafts depends on them)."""
    from tests.tiny_models import make_tiny_model_dir

    if not (client_model_root / "llama-fixed").exists():
        make_tiny_model_dir(client_model_root / "llama-fixed", "llama", seed=7)
    with ModelWorkerClient(paged.target, timeout=60) as c:
        c.load("cb-fixed", "llama-fixed", kv_cache=KvCacheConfig(block_size=BLOCK, num_blocks=24))
    return "cb-fixed"


def test_speculative_greedy_matches_plain_greedy(fixed: str, client) -> None:
    """n-gram drafts verified by the worker, under a tight token budget: the tokens are plain
    greedy's, and drafts were accepted (repetitive prompts, fixed weights) and saved steps."""
    rng = random.Random(5)
    prompts = [[rng.randrange(128) for _ in range(4)] * 3 for _ in range(4)] + [[3, 1, 4, 1, 5]]
    new = [14, 12, 10, 16, 9]
    calls = record_calls(client)
    result = cb.run(
        client, fixed, prompts, new, max_num_seqs=4, max_batch_tokens=12, num_speculative_tokens=3
    )
    assert_matches_reference(client, fixed, prompts, new, result)
    s = result.stats
    assert s.draft_tokens > 0 and 0 < s.accepted_draft_tokens <= s.draft_tokens, s
    assert any(c.get("num_draft_tokens") for c in calls)
    plain_steps = cb.run(client, fixed, prompts, new, max_num_seqs=4, max_batch_tokens=12).stats.steps
    assert s.steps < plain_steps


def test_seeded_sampling_is_reproducible_and_differs_by_seed(paged: RunningServer, client) -> None:
    prompts = [[7, 8, 9], [10, 11, 12, 13], [7, 8, 9]]
    sampling = cb.SamplingParams(temperature=1.5, top_p=0.95, seed=42)
    first = cb.run(client, "cb", prompts, 12, max_num_seqs=2, sampling=sampling).outputs
    again = cb.run(client, "cb", prompts, 12, max_num_seqs=3, sampling=sampling).outputs
    assert first == again  # other batching, same seeds: the same tokens
    assert first[0] != first[2]  # the same prompt, seed + index: another stream
    other = cb.run(client, "cb", prompts, 12, sampling=dataclasses.replace(sampling, seed=43)).outputs
    assert other != first
