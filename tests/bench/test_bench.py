"""The bench's own machinery: statistics, the alternation, goals and the table, process memory, the
read floor, and the two shortcuts its timed calls rely on (the transformers decoder that rewinds its
cache, and paged blocks copied instead of prefilled)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from bench.common import (
    Case,
    CpuSnapshot,
    Goal,
    Report,
    Row,
    Stats,
    alternate,
    foreign_cpu_share,
    is_noisy,
    paired_difference,
    proc_status,
    quantile,
    ratio,
    render_row,
    set_mmap_threshold,
    usable_cores,
)
from bench.inprocess import copy_blocks, paged_prefill
from bench.models import BENCH_KV, BenchModel, ReferenceDecoder, load_ours, new_registry
from bench.serving import DecodeCall, WorkerProcess, kv_config, read_floor, remote_prefill, run_clients
from registry.safetensors_loader import checkpoint_files
from tests.tiny_models import make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-models")
    save_hf_model(make_hf_model("llama", seed=5, max_position_embeddings=1024), root / "tiny")
    return root / "tiny"


def test_quantile_matches_numpy() -> None:
    rng = random.Random(1)
    for n in (1, 2, 5, 10, 37):
        values = [rng.uniform(-5, 5) for _ in range(n)]
        for q in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
            assert quantile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_stats_format_and_pairs() -> None:
    s = Stats((0.010, 0.012, 0.011, 0.030, 0.009))
    assert s.median == pytest.approx(0.011)
    assert s.best == pytest.approx(0.009)
    assert s.fmt("ms") == "11.0 ms (9.40–22.8)"
    assert Stats((871.4,)).fmt("s") == "871 s (871–871)"
    other = Stats((0.001, 0.002, 0.003, 0.004, 0.005))
    assert paired_difference(s, other).samples == pytest.approx((0.009, 0.010, 0.008, 0.026, 0.004))


def test_paired_ratio_cancels_noise_that_hits_a_round() -> None:
    ours = Stats((1.0, 5.0, 1.1, 0.9, 1.0))  # round 2 ran while the machine was busy...
    ref = Stats((2.0, 10.0, 2.0, 2.0, 2.0))  # ...for both candidates
    assert ratio(ours, ref) == pytest.approx(0.5)
    assert ratio(Stats((1.0, 3.0)), Stats((2.0,))) == pytest.approx(1.0)  # unpaired: medians
    assert is_noisy(Stats((1.0, 1.0, 5.0, 5.0))) and not is_noisy(Stats((1.0, 1.2, 1.3)))
    row = Row("x", "a", "b", 0.5, Goal(1.0), spread=(ours, Stats((1.0, 1.1, 1.2))))
    assert render_row(row).endswith("| yes: noisy (p90 > 2× p10: other work on the machine) |")


def test_foreign_cpu_share_counts_only_other_processes() -> None:
    def spin(seconds: float) -> None:
        # Until this process has used `seconds` of CPU: a busy machine stretches the wall time, not this.
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass

    start = CpuSnapshot.take()
    spin(0.3)  # our own work: not foreign (what other processes did meanwhile is the machine's business)
    end = CpuSnapshot.take()
    assert end.own - start.own >= 0.2  # the spin was counted as ours
    share = foreign_cpu_share(start, end, usable_cores())
    assert 0.0 <= share <= 1.0
    fake_end = CpuSnapshot(start.machine_busy + 2.0, start.own + 0.5, start.wall + 1.0)
    assert foreign_cpu_share(start, fake_end, 2) == pytest.approx(0.75)


def test_goals() -> None:
    assert Goal(1.0).met(1.0) and not Goal(1.0).met(1.01)
    assert not Goal(1.0, strict=True).met(1.0) and Goal(1.0, strict=True).met(0.99)
    assert Goal(6.0, at_least=True).met(6.0) and not Goal(6.0, at_least=True).met(5.9)
    assert str(Goal(0.9)) == "≤ 0.9×" and str(Goal(1.0, strict=True)) == "< 1×"
    assert str(Goal(6.0, at_least=True)) == "≥ 6×" and str(Goal(1, text="≤ +1 ms")) == "≤ +1 ms"
    assert Row("x", "a", "b", 1.2, Goal(1.5)).met is True
    assert Row("x", "a", "b", 1.6, Goal(1.5)).met is False
    assert Row("x", "a", "b", 1.6, "report").met is None


def test_alternation_order_warmup_and_hooks() -> None:
    calls: list[str] = []
    cleaned: list[object] = []
    cases = [
        Case(
            "a", lambda: calls.append("a") or "ra", prepare=lambda: calls.append("pa"), cleanup=cleaned.append
        ),
        Case("b", lambda: calls.append("b")),
    ]
    stats = alternate(cases, budget_s=0.0, min_reps=3, max_reps=10, warmup=1)
    # warm-up round (a b), then rounds reversed every other time: (b a) (a b) (b a)
    assert calls == ["pa", "a", "b", "b", "pa", "a", "pa", "a", "b", "b", "pa", "a"]
    assert cleaned == ["ra"] * 4
    assert all(len(s.samples) == 3 for s in stats.values())


def test_alternation_fills_its_budget_within_bounds() -> None:
    many = alternate([Case("x", lambda: None)], budget_s=10.0, min_reps=3, max_reps=25)
    assert len(many["x"].samples) == 25
    slow = alternate([Case("y", lambda: sum(range(20000)))], budget_s=0.0, min_reps=4, max_reps=25)
    assert len(slow["y"].samples) == 4


def test_table_rows() -> None:
    report = Report(header=["# title"])
    report.rows.append(Row("2. Prefill | 128", "1 ms", "2 ms", 0.5, Goal(1.0)))
    report.rows.append(Row("6. Roofline", "3 ms", "limit", 3.0, "report", note="30% of the limit"))
    report.rows.append(Row("3. Decode", "2 ms", "1 ms", 2.0, Goal(0.9), note="why"))
    text = report.markdown()
    lines = text.splitlines()
    assert lines[0] == "# title" and lines[2].startswith("| item | ours |")
    assert "| 2. Prefill / 128 | 1 ms | 2 ms | 0.50× | ≤ 1× | yes |" in lines
    assert render_row(report.rows[1]).endswith("| 3.00× | report | 30% of the limit |")
    assert render_row(report.rows[2]).endswith("| ≤ 0.9× | **no**: why |")


def test_proc_status_agrees_with_psutil() -> None:
    held = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB resident while we look
    status = proc_status(os.getpid())
    rss = psutil.Process().memory_info().rss
    assert abs(status["VmRSS"] - rss) < 16 << 20
    assert status["VmHWM"] >= status["VmRSS"] >= held.numel()


def test_fresh_pages_threshold_can_be_set() -> None:
    if not set_mmap_threshold(128 * 1024):
        pytest.skip("not glibc")
    assert set_mmap_threshold(32 << 20)


def test_read_floor_reads_every_tensor_exactly(tiny_dir: Path) -> None:
    files = checkpoint_files(tiny_dir)
    buffers = read_floor(files)
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    expected = sorted(t.contiguous().view(torch.uint8).reshape(-1).tolist() for t in tensors.values())
    assert sorted(b.tolist() for b in buffers) == expected


@torch.inference_mode()
def test_reference_decoder_step_matches_a_full_forward_and_rewinds() -> None:
    hf = make_hf_model("llama", seed=6).eval()
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(7))
    full = hf(ids, use_cache=False).logits[:, -1]
    dec = ReferenceDecoder(hf, ids[:, :19])
    for _ in range(3):  # the same step again and again: the context stays 20
        dec.rewind()
        got = dec.step(ids[:, 19:])[:, -1]
        torch.testing.assert_close(got, full, rtol=1e-4, atol=1e-4)
        assert dec.cache.get_seq_length() == 20
    # repeat: one prefill copied to every row; rows with different next tokens differ from each other
    batch = ReferenceDecoder(hf, ids[:, :19], repeat=3)
    tokens = torch.tensor([[int(ids[0, 19])], [1], [2]])
    out = batch.step(tokens)[:, -1]
    torch.testing.assert_close(out[0], full[0], rtol=1e-4, atol=1e-4)
    other = hf(torch.cat([ids[:, :19], tokens[1:2]], 1), use_cache=False).logits[0, -1]
    torch.testing.assert_close(out[1], other, rtol=1e-4, atol=1e-4)


def test_copied_blocks_decode_like_a_prefill(tiny_dir: Path) -> None:
    """The batched-decode shortcut: blocks copied from one prefilled sequence give every copy the
    logits a sequence prefilled on its own gets (checked against forward_with_cache)."""
    model = BenchModel("tiny", tiny_dir.parent, tiny_dir)
    ours = load_ours(new_registry([model.root]), "t", model, BENCH_KV)
    ctx = 40  # 2.5 blocks of 16: a partial last block
    ids = torch.randint(0, 128, (1, ctx), generator=torch.Generator().manual_seed(8))
    ours.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
    expected = ours.forward_with_cache(ids[:, ctx - 1 :], ctx - 1, 1, all_logits=False)
    tables = [[0, 1, 2], [9, 4, 7], [5, 11, 3]]
    paged_prefill(ours, ids[0, : ctx - 1], tables[0])
    copy_blocks(ours, tables[0], tables[1:])
    pos = ctx - 1
    slots = torch.tensor([t[pos // 16] * 16 + pos % 16 for t in tables])
    tokens = ids[0, -1].repeat(3)
    got = ours.forward_paged(tokens, torch.full((3,), pos), tables, slots, [ctx] * 3, False)
    for row in range(3):
        torch.testing.assert_close(got[row], expected[0], rtol=1e-5, atol=1e-5)


def test_worker_process_serves_loads_and_stops(tiny_dir: Path, tmp_path: Path) -> None:
    """The bench's worker subprocess: it starts on a free port, Loads through the client, answers
    concurrent decode clients (whose server-side compute adds up to the in-flight figure), reports
    its memory, and exits 0 on SIGTERM."""
    worker = WorkerProcess([tiny_dir.parent], 1, tmp_path / "worker.log")
    try:
        worker.wait_ready(timeout=120)
        assert worker.port > 0
        idle = proc_status(worker.pid)["VmRSS"]
        info = worker.client.load("a", tiny_dir, kv_cache=kv_config(BENCH_KV)).model
        assert info.vocab_size == 128 and info.kv_block_size == BENCH_KV.block_size
        assert proc_status(worker.pid)["VmRSS"] > idle
        remote_prefill(worker.client, "a", list(range(1, 20)))
        calls = [DecodeCall("a", 5, 19), DecodeCall("a", 6, 19)]
        rate, latencies, in_flight = run_clients(worker, calls, seconds=0.5)
        assert rate > 0 and len(latencies.samples) == pytest.approx(rate * 0.5, rel=0.5)
        assert 0 < in_flight <= 1.05  # one model: its lock lets one forward run at a time
    finally:
        worker.stop()
    assert worker.proc.returncode == 0
