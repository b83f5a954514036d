"""Stacked expert weights: per-expert checkpoint tensors fill slices (and fused shards) of one
parameter stacked over experts; strict loading names a missing expert as the checkpoint names it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from registry import ExpertPart, FusedPart, WeightMapping, WeightsMismatch, WeightTarget
from registry.safetensors_loader import load_weights

E, H, FF = 4, 6, 5  # experts, hidden, expert intermediate

QWEN_MOE = WeightMapping(
    fused=(FusedPart("gate_proj", "gate_up_proj", 0), FusedPart("up_proj", "gate_up_proj", 1)),
    experts=(
        ExpertPart("experts", "gate_proj", "gate_up_proj", 0),
        ExpertPart("experts", "up_proj", "gate_up_proj", 1),
        ExpertPart("experts", "down_proj", "down_proj"),
    ),
)
MIXTRAL = WeightMapping(
    experts=(
        ExpertPart("experts", "w1", "gate_up_proj", 0),
        ExpertPart("experts", "w3", "gate_up_proj", 1),
        ExpertPart("experts", "w2", "down_proj"),
    ),
)


class Experts(nn.Module):
    expert_shard_sizes = {"gate_up_proj": (FF, FF), "down_proj": None}

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * FF, H))  # [experts, gate rows + up rows, hidden]
        self.down_proj = nn.Parameter(torch.zeros(E, H, FF))


class SharedExpert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(H, 2 * FF, bias=False)
        self.gate_up_proj.shard_sizes = (FF, FF)  # type: ignore[assignment]


class Moe(nn.Module):
    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)  # the router: an ordinary parameter
        self.experts = Experts()
        if shared:
            self.shared_expert = SharedExpert()


class Layer(nn.Module):
    def __init__(self, block: str, shared: bool) -> None:
        super().__init__()
        self.add_module(block, Moe(shared))


class Toy(nn.Module):
    def __init__(self, block: str = "mlp", shared: bool = False, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Layer(block, shared) for _ in range(layers))


def qwen_tensors(seed: int, layers: int = 2, shared: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"layers.{i}.mlp"
        out[f"{p}.gate.weight"] = torch.randn(E, H, generator=g)
        for e in range(E):
            out[f"{p}.experts.{e}.gate_proj.weight"] = torch.randn(FF, H, generator=g)
            out[f"{p}.experts.{e}.up_proj.weight"] = torch.randn(FF, H, generator=g)
            out[f"{p}.experts.{e}.down_proj.weight"] = torch.randn(H, FF, generator=g)
        if shared:
            out[f"{p}.shared_expert.gate_proj.weight"] = torch.randn(FF, H, generator=g)
            out[f"{p}.shared_expert.up_proj.weight"] = torch.randn(FF, H, generator=g)
    return out


def write(tensors: dict[str, torch.Tensor], d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize("saved", [torch.float32, torch.bfloat16])
def test_qwen_moe_experts_fill_their_slices_and_shards(tmp_path: Path, saved: torch.dtype) -> None:
    tensors = {k: v.to(saved) for k, v in qwen_tensors(seed=3).items()}
    module = Toy(shared=True)
    load_weights(module, write(tensors, tmp_path / "m"), QWEN_MOE)
    for i, layer in enumerate(module.layers):
        moe, p = layer.mlp, f"layers.{i}.mlp"
        for e in range(E):
            want_gate_up = torch.cat(
                [tensors[f"{p}.experts.{e}.gate_proj.weight"], tensors[f"{p}.experts.{e}.up_proj.weight"]]
            )
            assert torch.equal(moe.experts.gate_up_proj[e], want_gate_up.float())
            assert torch.equal(moe.experts.down_proj[e], tensors[f"{p}.experts.{e}.down_proj.weight"].float())
        assert torch.equal(moe.gate.weight, tensors[f"{p}.gate.weight"].float())
        shared = torch.cat(
            [tensors[f"{p}.shared_expert.gate_proj.weight"], tensors[f"{p}.shared_expert.up_proj.weight"]]
        )
        assert torch.equal(moe.shared_expert.gate_up_proj.weight, shared.float())


def test_mixtral_names_under_block_sparse_moe(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(2):
        p = f"layers.{i}.block_sparse_moe"
        tensors[f"{p}.gate.weight"] = torch.randn(E, H, generator=g)
        for e in range(E):
            tensors[f"{p}.experts.{e}.w1.weight"] = torch.randn(FF, H, generator=g)
            tensors[f"{p}.experts.{e}.w3.weight"] = torch.randn(FF, H, generator=g)
            tensors[f"{p}.experts.{e}.w2.weight"] = torch.randn(H, FF, generator=g)
    module = Toy(block="block_sparse_moe")
    load_weights(module, write(tensors, tmp_path / "m"), MIXTRAL)
    experts = module.layers[1].block_sparse_moe.experts
    p = "layers.1.block_sparse_moe.experts"
    for e in range(E):
        assert torch.equal(experts.gate_up_proj[e, :FF], tensors[f"{p}.{e}.w1.weight"])
        assert torch.equal(experts.gate_up_proj[e, FF:], tensors[f"{p}.{e}.w3.weight"])
        assert torch.equal(experts.down_proj[e], tensors[f"{p}.{e}.w2.weight"])


def test_one_error_names_the_missing_expert_and_every_other_problem(tmp_path: Path) -> None:
    tensors = qwen_tensors(seed=7, shared=False)
    del tensors["layers.1.mlp.experts.2.up_proj.weight"]
    del tensors["layers.0.mlp.experts.3.down_proj.weight"]
    tensors["layers.0.mlp.experts.4.gate_proj.weight"] = torch.zeros(FF, H)  # expert 4 of 4 (0-3)
    tensors["layers.1.mlp.experts.0.down_proj.weight"] = torch.zeros(H, FF + 1)
    module = Toy()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(WeightsMismatch) as err:
        load_weights(module, write(tensors, tmp_path / "m"), QWEN_MOE)
    e = err.value
    assert e.missing == ["layers.0.mlp.experts.3.down_proj.weight", "layers.1.mlp.experts.2.up_proj.weight"]
    assert e.unexpected == ["layers.0.mlp.experts.4.gate_proj.weight"]
    assert e.mismatched == [
        f"layers.1.mlp.experts.0.down_proj.weight is [{H}, {FF + 1}], expected [{H}, {FF}]"
    ]
    assert "layers.1.mlp.experts.2.up_proj.weight" in str(e)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())  # nothing read


def test_a_whole_missing_expert_is_named_per_tensor(tmp_path: Path) -> None:
    tensors = {
        k: v for k, v in qwen_tensors(seed=9, layers=1, shared=False).items() if ".experts.1." not in k
    }
    with pytest.raises(WeightsMismatch) as err:
        load_weights(Toy(layers=1), write(tensors, tmp_path / "m"), QWEN_MOE)
    assert err.value.missing == [
        "layers.0.mlp.experts.1.down_proj.weight",
        "layers.0.mlp.experts.1.gate_proj.weight",
        "layers.0.mlp.experts.1.up_proj.weight",
    ]


def test_experts_already_stacked_in_the_checkpoint(tmp_path: Path) -> None:
    # Newer checkpoints store `experts.gate_up_proj` [experts, 2 * intermediate, hidden] as one tensor.
    g = torch.Generator().manual_seed(11)
    tensors = {
        "layers.0.mlp.gate.weight": torch.randn(E, H, generator=g),
        "layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * FF, H, generator=g),
        "layers.0.mlp.experts.down_proj": torch.randn(E, H, FF, generator=g),
    }
    module = Toy(layers=1)
    load_weights(module, write(tensors, tmp_path / "m"), QWEN_MOE)
    assert torch.equal(
        module.layers[0].mlp.experts.gate_up_proj, tensors["layers.0.mlp.experts.gate_up_proj"]
    )
    assert torch.equal(module.layers[0].mlp.experts.down_proj, tensors["layers.0.mlp.experts.down_proj"])


def test_expert_mapping_and_its_inverse() -> None:
    m = QWEN_MOE
    assert m.map("model.layers.3.mlp.experts.7.gate_proj.weight") == WeightTarget(
        "model.layers.3.mlp.experts.gate_up_proj", 0, 7
    )
    assert m.map("model.layers.3.mlp.experts.7.down_proj.weight") == WeightTarget(
        "model.layers.3.mlp.experts.down_proj", None, 7
    )
    assert m.map("model.layers.3.mlp.experts.7.up_proj.bias") == WeightTarget(
        "model.layers.3.mlp.experts.gate_up_proj_bias", 1, 7
    )
    # Not under `experts.<index>`: the fused (shared expert) and plain rules apply.
    assert m.map("model.layers.3.mlp.shared_expert.up_proj.weight") == WeightTarget(
        "model.layers.3.mlp.shared_expert.gate_up_proj.weight", 1
    )
    assert m.map("model.layers.3.mlp.experts.gate_proj.weight") == WeightTarget(
        "model.layers.3.mlp.experts.gate_up_proj.weight", 0
    )
    mixtral = "model.layers.0.block_sparse_moe.experts.5.w3.weight"
    assert MIXTRAL.map(mixtral) == WeightTarget("model.layers.0.block_sparse_moe.experts.gate_up_proj", 1, 5)
    for mapping, name in (
        (QWEN_MOE, "model.layers.3.mlp.experts.7.gate_proj.weight"),
        (QWEN_MOE, "model.layers.3.mlp.experts.0.up_proj.bias"),
        (QWEN_MOE, "model.layers.3.mlp.experts.12.down_proj.weight"),
        (MIXTRAL, mixtral),
    ):
        target = mapping.map(name)
        assert target is not None and mapping.checkpoint_name(target) == name
