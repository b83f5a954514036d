"""Mixture-of-experts blocks split over ranks, in process (loading runs no collective): each rank
reads only its rows of every expert (per-expert and stacked checkpoints) and of the shared expert,
the router is replicated, the ranks' partial outputs add up to the whole block's, and an
intermediate size that does not divide by the ranks is refused naming the field and the sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from architectures.mixtral import MixtralForCausalLM
from architectures.qwen2_moe import Qwen2MoeForCausalLM
from architectures.qwen3_moe import Qwen3MoeForCausalLM
from registry import InvalidConfig, ModelConfig
from registry.parallel import ParallelContext
from registry.safetensors_loader import load_weights
from tests.tensor_parallel.moe_models import MOE_LAYOUTS, make_moe_model_dir, stack_experts

NETWORKS = {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    root = tmp_path_factory.mktemp("moe_shards")
    out = {}
    for i, layout in enumerate(MOE_LAYOUTS):
        for stacked in (False, True):
            model_dir = make_moe_model_dir(root / f"{layout}-{stacked}", layout, seed=i)
            if stacked:
                stack_experts(model_dir)
            out[(layout, stacked)] = model_dir
    return out


def _build(layout: str, model_dir: Path, parallel: ParallelContext | None) -> torch.nn.Module:
    network = NETWORKS[layout]
    config = ModelConfig.from_file(model_dir / "config.json")
    with torch.device("meta"):
        net = network(config) if parallel is None else network(config, parallel)
    net = net.to_empty(device="cpu")
    net.tie_weights(config)
    load_weights(net, model_dir, network.weight_mapping)
    return net.eval().requires_grad_(False)


def _blocks(net: torch.nn.Module) -> list[torch.nn.Module]:
    return [
        getattr(layer, layer.mlp_name)
        for layer in net.model.layers
        if layer.mlp_name != "mlp" or hasattr(layer.mlp, "experts")
    ]


@pytest.mark.parametrize("stacked", [False, True], ids=["per-expert", "stacked"])
@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_each_rank_reads_its_rows_of_every_expert(checkpoints, layout: str, stacked: bool) -> None:
    model_dir = checkpoints[(layout, stacked)]
    whole = _build(layout, model_dir, None)
    for rank in range(2):
        shard = _build(layout, model_dir, ParallelContext(rank, 2, None))
        for full, part in zip(_blocks(whole), _blocks(shard), strict=True):
            n = full.experts.intermediate
            rows = slice(rank * n // 2, (rank + 1) * n // 2)
            gate, up = full.experts.gate_up_proj[:, :n], full.experts.gate_up_proj[:, n:]
            assert torch.equal(part.experts.gate_up_proj, torch.cat([gate[:, rows], up[:, rows]], dim=1))
            assert torch.equal(part.experts.down_proj, full.experts.down_proj[:, :, rows])
            assert torch.equal(part.gate.weight, full.gate.weight)  # the router is replicated
            if full.has_shared_expert:
                s = full.shared_expert.intermediate
                cut = slice(rank * s // 2, (rank + 1) * s // 2)
                w = full.shared_expert.gate_up_proj.weight
                assert torch.equal(
                    part.shared_expert.gate_up_proj.weight, torch.cat([w[:s][cut], w[s:][cut]])
                )
                assert torch.equal(
                    part.shared_expert.down_proj.weight, full.shared_expert.down_proj.weight[:, cut]
                )
                assert torch.equal(part.shared_expert_gate.weight, full.shared_expert_gate.weight)


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_partial_outputs_add_up_to_the_whole_block(checkpoints, layout: str) -> None:
    """Each rank's block (its all-reduce left out) gives a partial sum; the two sum to the block."""
    model_dir = checkpoints[(layout, False)]
    whole = _blocks(_build(layout, model_dir, None))[0]
    parts = [_blocks(_build(layout, model_dir, ParallelContext(r, 2, None)))[0] for r in range(2)]
    x = torch.randn(7, whole.gate.in_features, generator=torch.Generator().manual_seed(3))
    for part in parts:
        part.parallel = ParallelContext()  # no group: the all-reduce is the identity
    assert (parts[0](x) + parts[1](x) - whole(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_each_rank_holds_half_the_weights_plus_the_replicated_ones(checkpoints, layout: str) -> None:
    model_dir = checkpoints[(layout, False)]
    tensors = load_file(model_dir / "model.safetensors")
    whole = sum(t.numel() * t.element_size() for t in tensors.values())
    replicated = sum(  # norms, routers, the shared expert's gate
        t.numel() * t.element_size()
        for name, t in tensors.items()
        if name.endswith("norm.weight") or name.endswith(".gate.weight") or "shared_expert_gate" in name
    )
    per_rank = [
        sum(
            p.numel() * p.element_size()
            for p in _build(layout, model_dir, ParallelContext(r, 2, None)).parameters()
        )
        for r in range(2)
    ]
    assert per_rank == [(whole - replicated) // 2 + replicated] * 2


@pytest.mark.parametrize(
    ("layout", "overrides", "message"),
    [
        (
            "mixtral",
            dict(intermediate_size=50),
            "intermediate_size 50 does not divide over 4 tensor-parallel ranks",
        ),
        ("qwen3_moe", dict(moe_intermediate_size=18), "moe_intermediate_size 18 does not divide over 4"),
        (
            "qwen2_moe",
            dict(moe_intermediate_size=20, shared_expert_intermediate_size=26),
            "shared_expert_intermediate_size 26 does not divide over 4",
        ),
    ],
)
def test_an_intermediate_size_that_does_not_divide_is_refused(layout, overrides, message, tmp_path) -> None:
    import json

    model_dir = make_moe_model_dir(tmp_path / layout, layout, num_attention_heads=4)
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(overrides)
    config = ModelConfig.from_hf(raw, NETWORKS[layout].__name__)
    with torch.device("meta"), pytest.raises(InvalidConfig) as err:
        NETWORKS[layout](config, ParallelContext(0, 4, None))
    assert message in str(err.value) and NETWORKS[layout].__name__ in str(err.value)
