"""forward_paged of the real models (tiny random Llama with GQA, Mistral with a window shorter than
the contexts, Qwen2 with a window on some layers) against the same model's stateless `forward` over
each sequence's full token list, and against `forward_with_cache`, through a scheduler-like run:
prefill, decode steps, chunked and prefix-cached prefill, a mixed batch, freed blocks reused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from architectures import llama, qwen2
from registry import InvalidArgument, InvalidRequest, KvCacheOptions, LoadOptions
from tests.tiny_models import make_tiny_model_dir

from .reference import Scheduler

CPU = torch.device("cpu")
TOL = 1e-4
BUILDERS = {"llama": llama.build, "mistral": llama.build, "qwen2": qwen2.build}
MODELS = {
    "llama-gqa": ("llama", dict(max_position_embeddings=1024)),
    "mistral-window": ("mistral", dict(sliding_window=7, max_position_embeddings=1024)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
}
# block size → prompt lengths of the first three sequences
PROMPTS = {1: [6, 13, 21], 16: [9, 23, 40], 256: [300, 20, 260]}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("paged-models")
    return {
        name: make_tiny_model_dir(root / name, arch, seed=i + 11, **overrides)
        for i, (name, (arch, overrides)) in enumerate(MODELS.items())
    }


def load(model_dirs: dict[str, Path], name: str, block_size: int, num_blocks: int, **kv):
    arch = MODELS[name][0]
    options = LoadOptions(kv_cache=KvCacheOptions(block_size=block_size, num_blocks=num_blocks, **kv))
    return BUILDERS[arch](model_dirs[name], CPU, options)


CASES = [
    ("llama-gqa", 1),
    ("llama-gqa", 16),
    ("llama-gqa", 256),
    ("mistral-window", 16),
    ("mistral-window", 256),
    ("qwen2-window", 16),
]


@pytest.mark.parametrize(("name", "block_size"), CASES, ids=[f"{n}-bs{b}" for n, b in CASES])
def test_forward_paged_matches_forward(model_dirs, name: str, block_size: int) -> None:
    prompts = PROMPTS[block_size]
    num_blocks = 3 * sum(-(-p // block_size) + 2 for p in prompts)
    model = load(model_dirs, name, block_size, num_blocks)
    assert model.attention_backend == "torch"
    sched = Scheduler(model, seed=block_size + len(name))
    err = {
        "prefill (all rows)": sched.step([(0, prompts[0]), (1, prompts[1]), (2, prompts[2])], all_logits=True)
    }
    for i in range(3):
        err[f"decode {i}"] = sched.step([(0, 1), (1, 1), (2, 1)], is_prefill=False)
    err["decode (all rows)"] = sched.step([(2, 1), (0, 1)], is_prefill=False, all_logits=True)
    sched.release(0)
    sched.fork(2, 3, blocks=prompts[2] // block_size)
    err["chunked + prefix-cached prefill"] = sched.step([(1, 5), (3, 4)])
    err["mixed (all rows)"] = sched.step([(2, 1), (4, 11), (1, 1), (3, 1)], all_logits=True)
    err["mixed"] = sched.step([(4, 3), (3, 1), (2, 1)])
    err["decode after mixed"] = sched.step([(1, 1), (2, 1), (3, 1), (4, 1)], is_prefill=False)
    bad = {k: e for k, e in err.items() if not e <= TOL}
    assert not bad, f"{name} bs={block_size}: forward_paged differs from forward: {bad}"


def test_decode_matches_forward_with_cache(model_dirs) -> None:
    """One sequence decoded through the contiguous cache and through the paged cache, step by step."""
    model = load(model_dirs, "mistral-window", 4, 16, max_batch_size=1, max_seq_len=64)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, model.config.vocab_size, (1, 11), generator=gen)
    table = [9, 2, 14, 0, 5, 7]
    slot = lambda i: table[i // 4] * 4 + i % 4
    dense = model.forward_with_cache(prompt, 0, 11, all_logits=False)
    paged = model.forward_paged(
        prompt[0], torch.arange(11), [table], [slot(i) for i in range(11)], [11], True
    )
    torch.testing.assert_close(paged, dense, rtol=0, atol=TOL)
    for pos in range(11, 20):
        tok = paged.argmax(-1)
        dense = model.forward_with_cache(tok[:, None], pos, 1, all_logits=False)
        paged = model.forward_paged(tok, torch.tensor([pos]), [table], [slot(pos)], [pos + 1], False)
        torch.testing.assert_close(paged, dense, rtol=0, atol=TOL)


@pytest.mark.parametrize("table", [[3, 4, 5, 6, 7, 8], [9, 2, 14, 0, 5, 7]], ids=["consecutive", "scattered"])
def test_decode_over_consecutive_or_scattered_blocks(model_dirs, table: list[int]) -> None:
    """Without a window, a sequence whose blocks are consecutive is attended over a view of the
    cache, others through a gather; both match forward_with_cache, at contexts that fill their
    last block (no mask) and that do not."""
    model = load(model_dirs, "llama-gqa", 4, 16, max_batch_size=1, max_seq_len=64)
    gen = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, model.config.vocab_size, (1, 10), generator=gen)
    slot = lambda i: table[i // 4] * 4 + i % 4
    dense = model.forward_with_cache(prompt, 0, 10, all_logits=False)
    paged = model.forward_paged(
        prompt[0], torch.arange(10), [table], [slot(i) for i in range(10)], [10], True
    )
    for pos in range(10, 21):
        tok = paged.argmax(-1)
        dense = model.forward_with_cache(tok[:, None], pos, 1, all_logits=False)
        paged = model.forward_paged(tok, torch.tensor([pos]), [table], [slot(pos)], [pos + 1], False)
        torch.testing.assert_close(paged, dense, rtol=0, atol=TOL)


def test_rejected_call_leaves_the_paged_cache_unchanged(model_dirs) -> None:
    model = load(model_dirs, "llama-gqa", 16, 8)
    sched = Scheduler(model, seed=1)
    sched.step([(0, 20), (1, 5)])
    k, v = model.paged._k.clone(), model.paged._v.clone()
    seq = sched.seqs[0]
    slot = seq.table[1] * 16 + 4
    good = dict(
        input_tokens=[3, 4],
        positions=[20, 5],
        block_tables=[seq.table, sched.seqs[1].table],
        slot_mapping=[slot, sched.seqs[1].table[0] * 16 + 5],
        context_lens=[21, 6],
        is_prefill=False,
    )
    bad_calls = {
        "token beyond vocab": (dict(input_tokens=[3, 128]), "sequence 1: input_tokens[1] = 128"),
        "position beyond max": (dict(positions=[1024, 5]), "sequence 0: positions[0] = 1024"),
        "slot of another block": (dict(slot_mapping=[slot, slot + 1]), "sequence 1: slot_mapping[1]"),
        "context beyond blocks": (
            dict(context_lens=[33, 6]),
            "sequence 0: context_len 33 exceeds its 2 blocks",
        ),
    }
    for what, (change, message) in bad_calls.items():
        with pytest.raises(InvalidRequest) as info:
            model.forward_paged(**{**good, **change})
        assert message in str(info.value), what
        assert torch.equal(model.paged._k, k) and torch.equal(model.paged._v, v), what
    model.forward_paged(**good)
    assert not torch.equal(model.paged._k, k)


def test_load_with_flash_attn_where_it_cannot_run(model_dirs) -> None:
    options = LoadOptions(
        attention_backend="flash_attn", kv_cache=KvCacheOptions(block_size=256, num_blocks=4)
    )
    with pytest.raises(
        InvalidArgument, match="attention_backend flash_attn cannot run: it needs a CUDA device"
    ):
        llama.build(model_dirs["llama-gqa"], CPU, options)
    auto = LoadOptions(attention_backend="auto", kv_cache=KvCacheOptions(block_size=256, num_blocks=4))
    assert llama.build(model_dirs["llama-gqa"], CPU, auto).attention_backend == "torch"
