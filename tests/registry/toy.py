"""A minimal concrete Model and builders for contract tests of the registry (not of a network)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from registry import CacheSpec, LoadOptions, Model, ModelBuilder, ModelConfig

TOY_ARCH = "ToyForCausalLM"


def write_toy_dir(path: Path, architectures: Any = (TOY_ARCH,), **overrides: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg: dict[str, Any] = {
        "architectures": list(architectures) if isinstance(architectures, (list, tuple)) else architectures,
        "vocab_size": 11,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 32,
    }
    cfg.update(overrides)
    (path / "config.json").write_text(json.dumps(cfg))
    # A Load plans from the checkpoint's headers (weight bytes): one small tensor stands for the weights.
    save_file({"embed": torch.zeros(11, 8)}, str(path / "model.safetensors"))
    return path


class Tracker:
    """What the builders did, recorded under a lock so that threads can share it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[Path, torch.device, LoadOptions]] = []
        self.live: set[int] = set()  # ids of models built and not yet released
        self.events: list[str] = []

    def note(self, event: str) -> None:
        with self.lock:
            self.events.append(event)


class ToyModel(Model):
    """Logits are rows of a random table indexed by the token; the KV "cache" stores token ids.
    Enough to check what the registry hands out, and that nothing is used after release."""

    def __init__(
        self, config: ModelConfig, device: torch.device, options: LoadOptions, tracker: Tracker
    ) -> None:
        self.config = config
        self.options = options
        self.tracker = tracker
        self._device = device
        self.table = torch.randn(config.vocab_size, config.vocab_size, device=device)
        self.cache = torch.zeros(1, config.max_position_embeddings, dtype=torch.long, device=device)
        self.users = 0  # holders of get_model_mut right now; must never exceed 1
        self.released = False
        with tracker.lock:
            tracker.live.add(id(self))

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    @property
    def num_parameters(self) -> int:
        return self.table.numel()

    @property
    def weight_bytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    @property
    def cache_spec(self) -> CacheSpec:
        n = self.cache.numel() * self.cache.element_size()
        return CacheSpec(16, 0, self.cache.shape[1], 1, paged_bytes=0, contiguous_bytes=n)

    @property
    def attention_backend(self) -> str:
        return "torch"

    def _check(self) -> None:
        assert not self.released, "model used after release"

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *, all_logits: bool = True
    ) -> torch.Tensor:
        self._check()
        logits = self.table[input_ids]
        return logits if all_logits else logits[:, -1]

    def forward_with_cache(
        self,
        input_ids: torch.Tensor,
        start_pos: int,
        seq_len: int,
        positions: torch.Tensor | None = None,
        *,
        all_logits: bool = True,
    ) -> torch.Tensor:
        self._check()
        self.cache[: input_ids.shape[0], start_pos : start_pos + seq_len] = input_ids
        return self.forward(input_ids, all_logits=all_logits)

    def forward_paged(
        self,
        input_tokens: torch.Tensor,
        positions: torch.Tensor,
        block_tables: Sequence[Sequence[int]],
        slot_mapping: torch.Tensor,
        context_lens: Sequence[int],
        is_prefill: bool,
        query_lens: Sequence[int] | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        self._check()
        return self.table[input_tokens]

    def reset_kv_cache(self) -> None:
        self._check()
        self.cache.zero_()

    def slice_kv_cache(
        self, layer_idx: int, start_pos: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._check()
        ids = self.cache[:, start_pos : start_pos + length]
        return ids, ids

    def release(self) -> int:
        self._check()
        self.tracker.note(f"release {id(self)}")
        self.released = True
        with self.tracker.lock:
            self.tracker.live.discard(id(self))
        freed = self.weight_bytes + self.cache_spec.total_bytes
        self.table = self.cache = torch.empty(0)
        return freed


def toy_builder(
    tracker: Tracker,
    started: threading.Event | None = None,
    gate: threading.Event | None = None,
    fail: BaseException | None = None,
) -> ModelBuilder:
    """A builder `(model_dir, device, options) -> Model`. `started` is set when it runs, `gate` (if
    given) must open before it returns, `fail` is raised instead of returning a model."""

    def build(model_dir: Path, device: torch.device, options: LoadOptions) -> Model:
        with tracker.lock:
            tracker.calls.append((model_dir, device, options))
        if started is not None:
            started.set()
        if gate is not None and not gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        if fail is not None:
            raise fail
        return ToyModel(ModelConfig.from_file(model_dir / "config.json"), device, options, tracker)

    return build
