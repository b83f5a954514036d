"""`python -m worker serve` as a real subprocess with its JSON log lines collected as they come, and
the environment that lets such a process find the slow test architecture through an entry point."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tests.worker import slow_arch

REPO = Path(__file__).resolve().parents[1]


def plugin_env_for(site: Path) -> dict[str, str]:
    """A clean environment (no MODELWORKER_* settings leaking in) whose PYTHONPATH holds a dist-info
    with an entry point in `modelworker.architectures` for the slow test architecture, as a
    third-party package would install it."""
    dist = site / "modelworker_test_slow-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: modelworker-test-slow\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[modelworker.architectures]\nslow = {slow_arch.__name__}:register\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELWORKER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return env


class ServeLog:
    """`python -m worker serve --log-format json ARGS`; `raw` holds every stderr line, `lines` the
    ones that parsed as JSON log records."""

    wait_timeout = 60.0

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "serve", "--log-format", "json", *args],
            cwd=REPO,
            env=None if env is None else dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new:
                self.raw.append(line)
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    pass
                self._new.notify_all()

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float | None = None
    ) -> dict[str, Any]:
        """The first log record that satisfies `predicate`, waiting for it if need be."""
        deadline = time.monotonic() + (self.wait_timeout if timeout is None else timeout)
        with self._new:
            while True:
                found = next((line for line in self.lines if predicate(line)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError("log line not seen; worker stderr:\n" + "".join(self.raw))
                self._new.wait(min(left, 0.2))

    def wait_for_msg(self, pattern: str, timeout: float | None = None) -> re.Match[str]:
        """The match of `pattern` in the first record whose message it matches."""
        record = self.wait_for(lambda r: re.search(pattern, r["msg"]) is not None, timeout)
        match = re.search(pattern, record["msg"])
        assert match is not None
        return match

    def listening_port(self, timeout: float | None = None) -> int:
        """The port of the `listening on HOST:PORT` line."""
        return int(self.wait_for_msg(r"^listening on .*:(\d+)$", timeout).group(1))

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (if still running); the exit code once the process and its log are done."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
