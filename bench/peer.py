"""Another engine timed in a subprocess of its own, round by round with ours (bench/common.alternate):
the subprocess speaks one JSON line per request (bench/llamacpp_runner.py is the real one) and
reports the seconds it measured around its own call, so the pipe's round trip is not in its figure.
When the subprocess dies, that costs the row being measured ("crashed: signal 11"); the next row
starts a fresh one."""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .common import Case, Goal, Report, Row, Stats, alternate, ratio


class PeerFailed(RuntimeError):
    """The peer process died or answered with an error; str() is what the row prints."""


def exit_reason(returncode: int | None, stderr_tail: str) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        return f"crashed: signal {-returncode}"
    tail = stderr_tail.strip().splitlines()[-1:] if stderr_tail.strip() else []
    return f"exited with status {returncode}" + (f": {tail[0]}" if tail else "")


class PeerProcess:
    """One subprocess running `argv`; `request` sends a JSON object and returns the answer."""

    def __init__(
        self,
        argv: Sequence[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.argv = list(argv)
        self.cwd = cwd
        self.env = env
        self.timeout_s = timeout_s  # a request unanswered this long: the process is killed
        self.proc: subprocess.Popen[str] | None = None
        self.stderr: IO[str] | None = None  # a file, not a pipe: a chatty library cannot block on it
        self.hung = False
        self.ready: dict[str, Any] = {}

    def start(self) -> dict[str, Any]:
        self.stop()  # what is left of a process that died
        self.stderr = tempfile.TemporaryFile("w+")
        self.hung = False
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            cwd=self.cwd,
            env=self.env,
        )
        self.ready = self._read()
        return self.ready

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        if not self.alive:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._died()
        return self._read()

    def timed(self, msg: dict[str, Any]) -> float:
        return float(self.request(msg)["seconds"])

    def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        watchdog = threading.Timer(self.timeout_s, self._kill_hung)
        watchdog.start()
        try:
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    self._died()
                try:
                    answer = json.loads(line)
                except json.JSONDecodeError:
                    continue  # something the library printed on stdout
                if isinstance(answer, dict):
                    break
        finally:
            watchdog.cancel()
        if "error" in answer:
            raise PeerFailed(f"error: {answer['error']}")
        return answer

    def _died(self) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.hung:
            raise PeerFailed(f"no answer within {self.timeout_s:g} s (killed)")
        stderr = ""
        if self.stderr is not None:
            self.stderr.seek(0)
            stderr = self.stderr.read()[-2000:]
        raise PeerFailed(exit_reason(self.proc.returncode, stderr))

    def _kill_hung(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.hung = True
            self.proc.kill()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.alive:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:  # stdin's buffered bytes to a dead process
                    pass
        self.proc = self.stderr = None


@dataclass
class Comparison:
    """One row: `ours` and `others` (e.g. transformers) in-process, and the peer's timed request
    `peer_op` (after the untimed `setup` requests), alternating round by round."""

    item: str
    key: str
    ours: Case
    peer_op: dict[str, Any]
    peer_label: str  # "llama.cpp F32"
    goal: Goal | str | None = None
    setup: list[dict[str, Any]] = field(default_factory=list)
    others: list[Case] = field(default_factory=list)
    unit: str = "ms"
    digits: int = 3


def compare(
    report: Report,
    peer: PeerProcess,
    c: Comparison,
    budget_s: float,
    *,
    min_reps: int = 3,
    max_reps: int = 50,
    warmup: int = 1,
) -> dict[str, Stats] | None:
    """Time one comparison and add its row; the peer's failure becomes the row's verdict."""
    peer_samples: list[float] = []

    def run_peer() -> None:
        peer_samples.append(peer.timed(c.peer_op))

    try:
        for msg in c.setup:
            peer.request(msg)
        cases = [c.ours, Case("peer", run_peer), *c.others]
        stats = alternate(cases, budget_s, min_reps=min_reps, max_reps=max_reps, warmup=warmup)
    except PeerFailed as exc:
        if peer.proc is not None and not peer.alive:
            peer.stop()  # the next comparison starts a fresh process
        report.add(Row(c.item, "—", f"{c.peer_label}: {exc}", goal=c.goal, note=str(exc), key=c.key))
        return None
    kept = len(stats[c.ours.name].samples)
    stats["peer"] = Stats(tuple(peer_samples[-kept:]))  # its own timings, warm-up rounds dropped
    ours, theirs = stats[c.ours.name], stats["peer"]
    reference = f"{theirs.fmt(c.unit, c.digits)} {c.peer_label}"
    if c.others:
        best = min(c.others, key=lambda o: stats[o.name].median)
        reference += f" (transformers {best.name}: {stats[best.name].fmt(c.unit, c.digits)})"
    report.add(
        Row(
            c.item,
            ours.fmt(c.unit, c.digits),
            reference,
            ratio(ours, theirs),
            c.goal,
            key=c.key,
            spread=(ours, theirs),
        )
    )
    return stats
