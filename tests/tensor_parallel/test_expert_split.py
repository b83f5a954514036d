"""Experts split over ranks: a stacked expert parameter holding experts [start, start + count) reads
only those experts, from per-expert or stacked checkpoints; other ranks' experts are skipped, and a
missing expert of this rank is named by its checkpoint index."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from registry import ExpertPart, WeightMapping, WeightsMismatch
from registry.safetensors_loader import load_weights

E, H, FF = 4, 6, 5
MAPPING = WeightMapping(
    experts=(
        ExpertPart("experts", "gate_proj", "gate_up_proj", 0),
        ExpertPart("experts", "up_proj", "gate_up_proj", 1),
        ExpertPart("experts", "down_proj", "down_proj"),
    )
)


class LocalExperts(nn.Module):
    expert_shard_sizes = {"gate_up_proj": (FF, FF), "down_proj": None}

    def __init__(self, start: int, count: int) -> None:
        super().__init__()
        self.expert_range = (start, count, E)
        self.gate_up_proj = nn.Parameter(torch.zeros(count, 2 * FF, H))
        self.down_proj = nn.Parameter(torch.zeros(count, H, FF))


class Block(nn.Module):
    def __init__(self, start: int, count: int) -> None:
        super().__init__()
        self.experts = LocalExperts(start, count)


def _checkpoint(tmp_path: Path, stacked: bool, drop: str | None = None) -> tuple[Path, dict]:
    torch.manual_seed(7)
    gate, up, down = torch.randn(E, FF, H), torch.randn(E, FF, H), torch.randn(E, H, FF)
    if stacked:
        tensors = {"experts.gate_up_proj": torch.cat([gate, up], dim=1), "experts.down_proj": down}
    else:
        tensors = {}
        for e in range(E):
            tensors[f"experts.{e}.gate_proj.weight"] = gate[e]
            tensors[f"experts.{e}.up_proj.weight"] = up[e]
            tensors[f"experts.{e}.down_proj.weight"] = down[e]
    tensors.pop(drop, None)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    return tmp_path, {"gate_up": torch.cat([gate, up], dim=1), "down": down}


@pytest.mark.parametrize("stacked", [False, True])
def test_each_rank_loads_its_experts(tmp_path: Path, stacked: bool) -> None:
    model_dir, full = _checkpoint(tmp_path, stacked)
    for start, count in ((0, 2), (2, 2), (1, 3)):
        block = Block(start, count)
        load_weights(block, model_dir, MAPPING)
        assert torch.equal(block.experts.gate_up_proj, full["gate_up"][start : start + count])
        assert torch.equal(block.experts.down_proj, full["down"][start : start + count])


def test_a_missing_expert_of_this_rank_is_named_by_its_checkpoint_index(tmp_path: Path) -> None:
    model_dir, _ = _checkpoint(tmp_path, False, drop="experts.3.up_proj.weight")
    load_weights(Block(0, 2), model_dir, MAPPING)  # expert 3 is another rank's: not needed here
    with pytest.raises(WeightsMismatch) as err:
        load_weights(Block(2, 2), model_dir, MAPPING)
    assert "experts.3.up_proj.weight" in str(err.value)
