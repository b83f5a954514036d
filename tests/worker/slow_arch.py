"""A test architecture: Llama whose load and forward passes sleep for as long as its config.json asks
(`slow_load_seconds`, `slow_forward_seconds`). It makes "a call is running" a fact the tests control.
Registered directly by the in-process tests, and through a real entry point by the subprocess test."""

from __future__ import annotations

import functools
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from architectures import llama
from registry import LoadOptions, Model, ModelRegistry

SLOW_ARCH = "SlowLlamaForCausalLM"


def _slowed(fn: Callable[..., Any], seconds: float) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return fn(*args, **kwargs)

    return wrapper


def build(model_dir: Path, device: torch.device, options: LoadOptions) -> Model:
    cfg = json.loads((model_dir / "config.json").read_text())
    time.sleep(float(cfg.get("slow_load_seconds", 0)))
    model = llama.build(model_dir, device, options)
    delay = float(cfg.get("slow_forward_seconds", 0))
    if delay:
        for name in ("forward", "forward_with_cache", "forward_paged"):
            setattr(model, name, _slowed(getattr(model, name), delay))
    return model


def register(registry: ModelRegistry) -> None:
    registry.register_architecture(SLOW_ARCH, build)


def make_slow_copy(src: Path, dst: Path, load_seconds: float = 0.0, forward_seconds: float = 0.0) -> Path:
    """A copy of a tiny Llama directory whose config names the slow architecture."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = [SLOW_ARCH]
    cfg["slow_load_seconds"] = load_seconds
    cfg["slow_forward_seconds"] = forward_seconds
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst
