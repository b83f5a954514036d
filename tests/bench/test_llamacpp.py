"""Item 14's machinery: the peer subprocess and its line protocol (a fake runner that dies of SIGSEGV
costs one row, the next row gets a fresh process), the rows' figures and ratios, the decision to
install the `bench` extra (with the pip command injected: no network, no install), and, where
llama-cpp-python is installed, the real runner against our model on the France prompt."""

from __future__ import annotations

import importlib.util
import signal
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bench.common import Case, Goal, Report, render_row
from bench.context import Bench
from bench.llamacpp import (
    GGUF_CACHE,
    bench_requirements,
    ensure_llama_cpp,
    gguf_files,
    llamacpp,
    row_titles,
    runner,
)
from bench.models import BenchModel
from bench.peer import Comparison, PeerFailed, PeerProcess, compare, exit_reason

FAKE_RUNNER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    print("a banner the library printed", flush=True)
    print(json.dumps({"ready": True, "version": "fake"}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "quit":
            break
        if msg["op"] == os.environ.get("CRASH_ON"):
            os.kill(os.getpid(), signal.SIGSEGV)
        if msg["op"] == "hang":
            time.sleep(60)
        if msg["op"] == "bad":
            print(json.dumps({"error": "no such thing"}), flush=True)
            continue
        print(json.dumps({"seconds": 0.002, "pid": os.getpid()}), flush=True)
    """
)


@pytest.fixture()
def fake_runner(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_runner.py"
    script.write_text(FAKE_RUNNER)
    return [sys.executable, str(script)]


def _quick(name: str = "ours") -> Case:
    return Case(name, lambda: sum(range(100)))


def test_a_crashed_peer_costs_one_row_and_the_next_row_gets_a_fresh_process(fake_runner, monkeypatch) -> None:
    monkeypatch.setenv("CRASH_ON", "boom")
    peer = PeerProcess(fake_runner)
    report = Report()
    try:
        first = compare(report, peer, Comparison("14. a", "a", _quick(), {"op": "a"}, "fake", Goal(1.0)), 0.0)
        first_pid = peer.request({"op": "a"})["pid"]
        assert (
            compare(report, peer, Comparison("14. b", "b", _quick(), {"op": "boom"}, "fake", Goal(1.0)), 0.0)
            is None
        )
        third = compare(report, peer, Comparison("14. c", "c", _quick(), {"op": "c"}, "fake", Goal(1.0)), 0.0)
        assert peer.request({"op": "c"})["pid"] != first_pid
    finally:
        peer.stop()
    assert first is not None and third is not None
    assert [r.item for r in report.rows] == ["14. a", "14. b", "14. c"]
    crashed = report.rows[1]
    assert crashed.reference == "fake: crashed: signal 11" and crashed.note == "crashed: signal 11"
    assert crashed.ratio is None and crashed.met is None
    assert render_row(crashed) == "| 14. b | — | fake: crashed: signal 11 | — | ≤ 1× | crashed: signal 11 |"
    for stats, row in ((first, report.rows[0]), (third, report.rows[2])):
        # The peer's figures are the seconds it reported, one per kept round, like ours.
        assert stats["peer"].samples == (0.002,) * len(stats["ours"].samples)
        assert row.ratio == pytest.approx(stats["ours"].median / 0.002, rel=0.5)
        assert row.met is True and row.reference == "2.00 ms (2.00–2.00) fake"


def test_rows_name_the_fastest_transformers_and_the_peer_figure(fake_runner) -> None:
    peer = PeerProcess(fake_runner)
    report = Report()
    slow = Case("eager", lambda: sum(range(200_000)))
    fast = Case("sdpa", lambda: None)
    try:
        stats = compare(
            report,
            peer,
            Comparison(
                "14. x",
                "x",
                Case("ours", lambda: None),
                {"op": "x"},
                "llama.cpp F32",
                "report",
                others=[slow, fast],
            ),
            0.0,
            min_reps=4,
        )
    finally:
        peer.stop()
    assert stats is not None and len(stats["peer"].samples) == 4
    row = report.rows[0]
    assert row.reference == f"2.00 ms (2.00–2.00) llama.cpp F32 (transformers sdpa: {stats['sdpa'].fmt()})"
    assert row.goal == "report" and row.met is None and row.ratio < 1.0


def test_peer_errors_and_exits_are_named(fake_runner, tmp_path: Path) -> None:
    peer = PeerProcess(fake_runner)
    try:
        with pytest.raises(PeerFailed, match="^error: no such thing$"):
            peer.request({"op": "bad"})
        assert peer.alive  # an error answer is not a crash
    finally:
        peer.stop()
    peer = PeerProcess(fake_runner, timeout_s=0.5)
    try:
        with pytest.raises(PeerFailed, match=r"^no answer within 0.5 s \(killed\)$"):
            peer.request({"op": "hang"})
        assert peer.request({"op": "x"})["seconds"] == 0.002  # a fresh process
    finally:
        peer.stop()
    dying = tmp_path / "dying.py"
    dying.write_text(
        "import sys\nprint('llama_cpp: cannot open shared object', file=sys.stderr)\nsys.exit(3)\n"
    )
    peer = PeerProcess([sys.executable, str(dying)])
    with pytest.raises(PeerFailed, match="^exited with status 3: llama_cpp: cannot open shared object$"):
        peer.start()
    peer.stop()
    assert exit_reason(-signal.SIGSEGV, "") == "crashed: signal 11"
    assert exit_reason(1, "") == "exited with status 1"


def _bench(tmp_path: Path) -> Bench:
    model = BenchModel("SmolLM2-135M", tmp_path, tmp_path / "smol")
    return Bench(quick=True, threads=1, report=Report(), registry=None, models=[model])  # type: ignore[arg-type]


def test_installed_extra_is_not_installed_again(tmp_path: Path) -> None:
    marker = tmp_path / "pip-ran"
    pip = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    assert ensure_llama_cpp(pip, importable=lambda: True) == (True, "")
    assert not marker.exists()


def test_a_failed_install_gives_not_installed_rows_and_the_bench_goes_on(tmp_path: Path, capsys) -> None:
    pip = [
        sys.executable,
        "-c",
        "import sys; print('Collecting llama-cpp-python'); "
        "print('ERROR: No matching distribution found for llama-cpp-python==0.3.36', file=sys.stderr); sys.exit(1)",
    ]
    ok, reason = ensure_llama_cpp(pip, importable=lambda: False)
    assert (ok, reason) == (False, "ERROR: No matching distribution found for llama-cpp-python==0.3.36")
    out = capsys.readouterr().out
    assert "installing the bench extra" in out and "install failed after" in out

    b = _bench(tmp_path)
    llamacpp(b, install=lambda: (ok, reason))
    titles = [title for title, _ in row_titles("SmolLM2-135M")]
    assert [r.item for r in b.report.rows] == titles and len(titles) == 7
    for row in b.report.rows:
        assert row.reference == f"llama.cpp: not installed: {reason}" and row.met is None


def test_install_then_import(tmp_path: Path, capsys) -> None:
    ran = tmp_path / "pip-ran"
    pip = [sys.executable, "-c", f"open({str(ran)!r}, 'w')"]
    assert ensure_llama_cpp(pip, importable=lambda: ran.exists()) == (True, "")
    assert "installed in" in capsys.readouterr().out
    assert ensure_llama_cpp(pip, importable=lambda: False) == (
        False,
        "pip succeeded but llama_cpp is still not importable",
    )


def test_gguf_conversions_are_cached_and_a_crashed_one_is_named(tmp_path: Path) -> None:
    src = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src.write_bytes(b"GGUF")
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    cache = tmp_path / "cache"
    files = gguf_files(src, cache, python=str(crashing))
    assert files == {
        "Q4_1": src,
        "F32": "conversion to F32 failed: crashed: signal 11",
        "Q8_0": "conversion to Q8_0 failed: crashed: signal 11",
    }
    assert sorted(p.name for p in cache.iterdir()) == []  # no half-written file left
    for fmt in ("F32", "Q8_0"):
        (cache / f"SmolLM2-135M-Instruct.{fmt}.gguf").write_bytes(b"GGUF")
    files = gguf_files(src, cache, python=str(crashing))  # cached: nothing runs
    assert files["F32"] == cache / "SmolLM2-135M-Instruct.F32.gguf"
    assert files["Q8_0"] == cache / "SmolLM2-135M-Instruct.Q8_0.gguf"


def test_the_extra_is_declared_in_pyproject() -> None:
    assert bench_requirements() == ["llama-cpp-python==0.3.36"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llama_cpp_f32_says_paris_like_ours() -> None:
    from transformers import AutoTokenizer

    from architectures import llama
    from registry import KvCacheOptions, LoadOptions
    from tests.real_model import PROMPT, smollm2_gguf, smollm2_hf_dir

    gguf = smollm2_gguf()
    hf_dir = smollm2_hf_dir()
    files = gguf_files(gguf, hf_dir.parent / GGUF_CACHE)
    assert isinstance(files["F32"], Path), files["F32"]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    prompt = tokenizer(PROMPT).input_ids

    ours = llama.build(hf_dir, torch.device("cpu"), LoadOptions(kv_cache=KvCacheOptions(max_seq_len=64)))
    ours.reset_kv_cache()
    logits = ours.forward_with_cache(torch.tensor([prompt]), 0, len(prompt), all_logits=False)
    expected = [int(logits[0].argmax())]
    logits = ours.forward_with_cache(torch.tensor([expected]), len(prompt), 1, all_logits=False)
    expected.append(int(logits[0].argmax()))

    peer = runner(files["F32"], threads=1)
    try:
        assert peer.start()["ready"] is True
        assert peer.request({"op": "greedy", "tokens": prompt, "n": 2})["tokens"] == expected
        assert tokenizer.decode(expected[:1]) == " Paris"
        assert peer.timed({"op": "prefill", "tokens": prompt}) > 0
        peer.request({"op": "context", "tokens": prompt})
        assert peer.timed({"op": "step", "token": expected[0]}) > 0
        assert peer.timed({"op": "load"}) > 0
    finally:
        peer.stop()
