"""examples/rl_weight_sync.py, run as a trainer process against a real worker, passes every check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from worker.client import ModelWorkerClient

REPO = Path(__file__).resolve().parents[2]


def test_rl_weight_sync_example(worker, update_root) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELWORKER_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "rl_weight_sync.py"),
            "--address",
            worker.target,
            "--model",
            "example-policy",
            "--checkpoint",
            str(update_root / "llama-a"),
            "--model-dir",
            "llama-a",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all checks passed" in done.stdout
    with ModelWorkerClient(worker.target, timeout=60) as client:
        client.unload("example-policy")
