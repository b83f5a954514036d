"""Updates reach stacked expert weights through the same mapping as Load: per-expert checkpoint
tensors (and fused gate/up shards of them) fill slices of one stacked parameter, bit for bit as a
Load of the same tensors; a mis-shaped or unknown expert is refused before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from registry.errors import WeightsMismatch
from registry.safetensors_loader import load_weights
from registry.weight_update import (
    TensorAssembler,
    TensorChecker,
    UpdateTarget,
    apply_update,
    check_update,
)
from tests.registry.test_expert_stacking import QWEN_MOE, E, Toy, qwen_tensors


def stream_into(target: UpdateTarget, tensors: dict[str, torch.Tensor], piece: int = 64) -> None:
    """What UpdateWeightsFromStream does with a model's tensors: pieces, checks, one apply."""
    assembler = TensorAssembler(TensorChecker(target), where="test stream")
    for name, t in tensors.items():
        data = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
        for offset in range(0, len(data), piece):
            assembler.add(name, t.dtype, t.shape, data[offset : offset + piece], offset, len(data))
    specs, staged = assembler.finish()
    apply_update(target, check_update(target, specs, where="test stream"), staged)


def test_streamed_experts_equal_a_load(tmp_path: Path) -> None:
    tensors = qwen_tensors(seed=3, shared=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = Toy(shared=True)
    load_weights(loaded, tmp_path, QWEN_MOE)
    updated = Toy(shared=True)
    load_weights(updated, tmp_path, QWEN_MOE)
    with torch.no_grad():
        for p in updated.parameters():
            p.zero_()
    stream_into(UpdateTarget(updated, QWEN_MOE), tensors)
    for (name, a), (_, b) in zip(loaded.named_parameters(), updated.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_bad_experts_are_refused_before_any_write() -> None:
    target = UpdateTarget(Toy(shared=True), QWEN_MOE)
    before = [p.clone() for p in target.network.parameters()]
    tensors = qwen_tensors(seed=4, shared=True)
    wrong = dict(tensors)
    name = "layers.1.mlp.experts.2.up_proj.weight"
    wrong[name] = wrong[name][:-1]
    with pytest.raises(WeightsMismatch, match=r"experts\.2\.up_proj\.weight is \[4, 6\]"):
        stream_into(target, wrong)
    extra = dict(tensors)
    extra[f"layers.0.mlp.experts.{E}.down_proj.weight"] = tensors["layers.0.mlp.experts.0.down_proj.weight"]
    with pytest.raises(WeightsMismatch, match=f"unexpected 1 weight.*experts.{E}.down_proj"):
        stream_into(target, extra)
    missing = {k: v for k, v in tensors.items() if k != "layers.0.mlp.experts.3.gate_proj.weight"}
    with pytest.raises(WeightsMismatch, match=r"missing 1 weight.*experts\.3\.gate_proj\.weight"):
        stream_into(target, missing)
    for a, b in zip(before, target.network.parameters(), strict=True):
        assert torch.equal(a, b)
