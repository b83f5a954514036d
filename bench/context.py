"""State shared by the bench items of one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from registry import Model, ModelRegistry

from .common import Report, Stats
from .models import BENCH_KV, BenchModel, load_ours


@dataclass
class Bench:
    quick: bool
    threads: int
    report: Report
    registry: ModelRegistry
    models: list[BenchModel]  # SmolLM2 first, then the tiny model
    ours: dict[str, Model] = field(default_factory=dict)  # label → our model (BENCH_KV caches)
    refs: dict[str, dict[str, Any]] = field(default_factory=dict)  # label → attention → transformers model
    bandwidth: float = 0.0  # bytes/s
    figures: dict[str, Stats] = field(default_factory=dict)  # measured by one item, used by another
    labels: dict[str, str] = field(default_factory=dict)  # names that go with figures
    seed: int = 0
    compiled: dict[str, Model] = field(default_factory=dict)  # label → the same model with compile_decode
    # Measured in this run: label → (seconds, bytes) of the decode step's GEMVs alone (item 3), and
    # row key → why its goal is missed, which takes the place of the written reason in reasons.py.
    gemv_floors: dict[str, tuple[float, int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    def compiled_model(self, model: BenchModel) -> Model:
        """`model` loaded again with compile_decode (items 3 and 14), once per run; the compile time
        is in its compile_seconds."""
        if model.label not in self.compiled:
            model_id = "bench-compiled-" + model.label.lower().replace(" ", "-")
            self.compiled[model.label] = load_ours(
                self.registry, model_id, model, BENCH_KV, compile_decode=True
            )
        return self.compiled[model.label]

    @property
    def smol(self) -> BenchModel:
        return self.models[0]

    def budget(self, seconds: float) -> float:
        """Seconds an item may spend timing one comparison (a quick run spends a quarter)."""
        return seconds / 4 if self.quick else seconds

    def tokens(self, model: BenchModel, *shape: int) -> torch.Tensor:
        """Fresh random token ids for `model` (a new draw per call, reproducible per run)."""
        self.seed += 1
        vocab = self.ours[model.label].config.vocab_size
        return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(self.seed))
