"""How a model is split over ranks, and that each rank's load reads exactly its slices (in process:
loading runs no collective, so a rank's shard is built without a process group)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from architectures.llama import LlamaForCausalLM
from registry import InvalidConfig, ModelConfig
from registry.parallel import AttentionShard, ParallelContext, attention_shard, even_range
from registry.safetensors_loader import load_weights
from tests.tiny_models import make_tiny_model_dir

UNEVEN = dict(
    tie_word_embeddings=False,
    num_attention_heads=6,
    num_key_value_heads=3,
    hidden_size=48,
    vocab_size=127,
    intermediate_size=99,
)


def test_attention_split_by_kv_groups() -> None:
    # SmolLM2: 9 heads in 3 KV groups over 2 ranks → groups 0-1 (6 heads) and group 2 (3 heads).
    assert [attention_shard(9, 3, 2, r) for r in range(2)] == [
        AttentionShard(0, 6, 0, 2),
        AttentionShard(6, 3, 2, 1),
    ]
    # Fewer KV heads than ranks: each rank holds one KV head (replicated), its query heads split.
    assert [attention_shard(8, 2, 4, r) for r in range(4)] == [
        AttentionShard(0, 2, 0, 1),
        AttentionShard(2, 2, 0, 1),
        AttentionShard(4, 2, 1, 1),
        AttentionShard(6, 2, 1, 1),
    ]
    # 3 KV heads over 4 ranks: head 0 gets two ranks, and its 2 query heads are split between them.
    shards = [attention_shard(6, 3, 4, r) for r in range(4)]
    assert sorted(h for s in shards for h in range(s.q_start, s.q_start + s.num_heads)) == list(range(6))
    with pytest.raises(InvalidConfig, match="over 4 ranks needs at least 4 query heads; the model has 3"):
        attention_shard(3, 1, 4, 0)


def test_even_range_covers_everything_once() -> None:
    for total, parts in ((127, 2), (99, 4), (5, 5)):
        ranges = [even_range(total, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1


def _shard(model_dir: Path, rank: int, world: int) -> LlamaForCausalLM:
    config = ModelConfig.from_file(model_dir / "config.json")
    with torch.device("meta"):
        net = LlamaForCausalLM(config, ParallelContext(rank, world, None))
    net = net.to_empty(device="cpu")
    net.tie_weights(config)
    load_weights(net, model_dir, LlamaForCausalLM.weight_mapping)
    return net


@pytest.mark.parametrize("fused_checkpoint", [False, True])
def test_each_rank_reads_its_slices(tmp_path: Path, fused_checkpoint: bool) -> None:
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama", seed=3, **UNEVEN)
    full = load_file(model_dir / "model.safetensors")
    if fused_checkpoint:  # Phi-3 style: q/k/v and gate/up stored fused; each rank cuts every part
        fused = {}
        for name, t in full.items():
            if ".q_proj." in name:
                parts = [full[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                fused[name.replace("q_proj", "qkv_proj")] = torch.cat(parts)
            elif ".gate_proj." in name:
                parts = [full[name.replace("gate_proj", p)] for p in ("gate_proj", "up_proj")]
                fused[name.replace("gate_proj", "gate_up_proj")] = torch.cat(parts)
            elif not any(p in name for p in (".k_proj.", ".v_proj.", ".up_proj.")):
                fused[name] = t
        (model_dir / "model.safetensors").unlink()
        save_file(fused, model_dir / "model.safetensors")
    d = 8  # head_dim = 48 / 6
    for rank, (heads, kv, rows, vocab) in enumerate(
        (((0, 4), (0, 2), (0, 50), (0, 64)), ((4, 6), (2, 3), (50, 99), (64, 127)))
    ):
        net = _shard(model_dir, rank, 2)
        attn, mlp = net.model.layers[1].self_attn, net.model.layers[1].mlp
        q = full["model.layers.1.self_attn.q_proj.weight"][heads[0] * d : heads[1] * d]
        k = full["model.layers.1.self_attn.k_proj.weight"][kv[0] * d : kv[1] * d]
        v = full["model.layers.1.self_attn.v_proj.weight"][kv[0] * d : kv[1] * d]
        assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
        o = full["model.layers.1.self_attn.o_proj.weight"][:, heads[0] * d : heads[1] * d]
        assert torch.equal(attn.o_proj.weight, o)
        gate = full["model.layers.1.mlp.gate_proj.weight"][rows[0] : rows[1]]
        up = full["model.layers.1.mlp.up_proj.weight"][rows[0] : rows[1]]
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate, up]))
        assert torch.equal(
            mlp.down_proj.weight, full["model.layers.1.mlp.down_proj.weight"][:, rows[0] : rows[1]]
        )
        assert torch.equal(
            net.model.embed_tokens.weight, full["model.embed_tokens.weight"][vocab[0] : vocab[1]]
        )
        assert torch.equal(net.lm_head.weight, full["lm_head.weight"][vocab[0] : vocab[1]])
        assert torch.equal(net.model.norm.weight, full["model.norm.weight"])  # replicated


def test_resident_weight_bytes_per_rank(tmp_path: Path) -> None:
    """Each rank's parameters: about 1/N of the model plus the replicated norms."""
    model_dir = make_tiny_model_dir(tmp_path / "m", "llama", seed=1, num_key_value_heads=2)
    config = json.loads((model_dir / "config.json").read_text())
    whole = sum(t.numel() * t.element_size() for t in load_file(model_dir / "model.safetensors").values())
    norms = 4 * config["hidden_size"] * (2 * config["num_hidden_layers"] + 1)
    per_rank = [
        sum(p.numel() * p.element_size() for p in _shard(model_dir, r, 2).parameters()) for r in range(2)
    ]
    assert sum(per_rank) == whole + norms  # every sharded byte exactly once, the norms on each rank
    assert all(b == (whole - norms) // 2 + norms for b in per_rank)


def test_kubernetes_tensor_parallel_examples_parse_as_settings() -> None:
    """Every pod's args are valid `serve` flags; GPUs per pod × pods = the tensor-parallel size."""
    import yaml

    from worker.__main__ import build_parser, settings_from_args

    root = Path(__file__).resolve().parents[2]
    docs = list(yaml.safe_load_all((root / "deploy" / "kubernetes-tensor-parallel.yaml").read_text()))
    pod = docs[0]["spec"]["template"]["spec"]["containers"][0]
    env = {"LWS_LEADER_ADDRESS": "10.0.0.1", "LWS_WORKER_INDEX": "1"}

    def settings(container: dict) -> object:
        args = [
            a.replace("$(LWS_LEADER_ADDRESS)", "10.0.0.1").replace("$(LWS_WORKER_INDEX)", "1")
            for a in container["args"]
        ]
        return settings_from_args(build_parser().parse_args(["serve", *args]), env)

    single = settings(pod)
    assert single.tensor_parallel_size == pod["resources"]["limits"]["nvidia.com/gpu"] == 2
    lws = docs[1]["spec"]["leaderWorkerTemplate"]
    leader = settings(lws["leaderTemplate"]["spec"]["containers"][0])
    worker_container = lws["workerTemplate"]["spec"]["containers"][0]
    worker = settings(worker_container)
    gpus = worker_container["resources"]["limits"]["nvidia.com/gpu"]
    assert leader.nnodes == worker.nnodes == lws["size"]
    assert leader.tensor_parallel_size == worker.tensor_parallel_size == lws["size"] * gpus
    assert (leader.node_rank, worker.node_rank) == (0, 1)
    assert leader.master_port == worker.master_port != 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODELWORKER_TENSOR_PARALLEL_SIZE": "0"}, "MODELWORKER_TENSOR_PARALLEL_SIZE: must be >= 1, got 0"),
        (
            {"MODELWORKER_TENSOR_PARALLEL_SIZE": "4", "MODELWORKER_NNODES": "3"},
            "divide tensor_parallel_size 4",
        ),
        (
            {
                "MODELWORKER_TENSOR_PARALLEL_SIZE": "4",
                "MODELWORKER_NNODES": "2",
                "MODELWORKER_NODE_RANK": "2",
            },
            "MODELWORKER_NODE_RANK: must be in [0, nnodes = 2), got 2",
        ),
        (
            {"MODELWORKER_TENSOR_PARALLEL_SIZE": "4", "MODELWORKER_NNODES": "2"},
            "master_port: must be in [1, 65535]",
        ),
    ],
)
def test_tensor_parallel_settings_are_checked(env: dict[str, str], message: str) -> None:
    from worker.settings import SettingsError, build_settings

    with pytest.raises(SettingsError) as err:
        build_settings({}, env)
    assert message in str(err.value)


def test_bench_measures_both_sizes(tmp_path: Path) -> None:
    """bench.tensor_parallel on a tiny model: rank 0 reports times, and collectives only at TP=2."""
    from bench.tensor_parallel import measure

    model_dir = make_tiny_model_dir(tmp_path / "m", "llama", seed=5)
    prefill, decode, collectives = measure(2, 1, model_dir, {"rounds": 1, "prompt": 8})
    assert collectives > 0 and prefill > 0 and decode > 0


def test_bench_item_15_rows() -> None:
    """`python -m bench --items 15`: two rows numbered 15, TP=2 against TP=1, collectives named."""
    from bench.__main__ import ITEMS, parse_args
    from bench.common import render_row
    from bench.tensor_parallel import rows

    assert 15 in ITEMS
    assert parse_args(["--items", "15"]).items == "15"
    prefill, decode = rows((0.2, 0.04, 0.0), (0.4, 0.1, 0.06), 2, 1, 2, {"rounds": 5, "prompt": 128})
    assert prefill.item.startswith("15. Prefill 128, SmolLM2, TP=2 (1 thread/rank) vs TP=1 (2 threads)")
    assert (prefill.ours, prefill.reference, prefill.ratio) == ("400.0 ms", "TP=1: 200.0 ms", 2.0)
    assert decode.item.startswith("15. Decode step, context 128") and decode.ratio == 2.5
    assert "collectives 60.0 ms of the step" in render_row(decode)


def test_rank_memory_metric_reads_each_rank_process() -> None:
    import os

    from prometheus_client import CollectorRegistry, generate_latest

    from worker.tensor_parallel import RankMemoryCollector

    registry = CollectorRegistry()
    registry.register(RankMemoryCollector(lambda: [(0, os.getpid()), (1, 2**22 + 12345)]))
    text = generate_latest(registry).decode()
    lines = [line for line in text.splitlines() if line.startswith("modelworker_rank_resident_bytes{")]
    assert len(lines) == 1 and lines[0].startswith('modelworker_rank_resident_bytes{rank="0"}')
    assert float(lines[0].split()[-1]) > 10 * 2**20  # this process holds torch: tens of MiB at least


def test_load_plan_admits_this_ranks_share_of_the_weights(tmp_path: Path) -> None:
    """Admission (the worker's memory check) reads plan.weight_bytes: under tensor parallelism a rank
    needs 1/N of the checkpoint, so a model bigger than one device can be admitted."""
    from architectures.backends import BACKENDS
    from registry import LoadOptions
    from registry.load_plan import make_load_plan

    model_dir = make_tiny_model_dir(tmp_path / "m", "llama", seed=2)
    config = ModelConfig.from_file(model_dir / "config.json")
    plan = lambda parallel: make_load_plan(  # noqa: E731
        model_dir,
        config.architecture,
        config,
        LoadOptions(),
        torch.device("cpu"),
        BACKENDS,
        parallel=parallel,
    )
    whole = plan(ParallelContext()).weight_bytes
    assert whole == (model_dir / "model.safetensors").stat().st_size - 8 - int.from_bytes(
        (model_dir / "model.safetensors").read_bytes()[:8], "little"
    )
    assert plan(ParallelContext(1, 2, None)).weight_bytes == -(-whole // 2)


class _OtherRank(ParallelContext):
    """Rank 0 of 2 whose outcome exchange reports `outcome` for rank 1 (the one collective of an
    update, standing in for a second process)."""

    def __init__(self, outcome: BaseException | None) -> None:
        super().__init__(0, 2, None)
        self.outcome = outcome

    def all_gather_object(self, obj: object) -> list[object]:
        return [obj, self.outcome]


def test_a_weight_update_applies_only_when_every_rank_staged_its_slices(tmp_path: Path) -> None:
    """All or nothing across ranks: rank 1 failing to stage leaves rank 0's shard untouched (and
    rank 0 raises rank 1's error); once both staged, rank 0's shard is a fresh load's, bit for bit."""
    from types import SimpleNamespace

    from registry.errors import CorruptCheckpoint
    from worker.tensor_parallel import _update_and_agree

    old = make_tiny_model_dir(tmp_path / "old", "llama", seed=1, **UNEVEN)
    new = make_tiny_model_dir(tmp_path / "new", "llama", seed=2, **UNEVEN)
    net = _shard(old, 0, 2)
    model = SimpleNamespace(network=net, device=torch.device("cpu"))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CorruptCheckpoint, match="on rank 1"):
        _update_and_agree(model, _OtherRank(CorruptCheckpoint("model.safetensors ends early on rank 1")), new)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    count, nbytes = _update_and_agree(model, _OtherRank(None), new)
    fresh = _shard(new, 0, 2).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in net.state_dict().items())
    full = load_file(new / "model.safetensors")
    assert count == len(full) and nbytes == sum(t.numel() * t.element_size() for t in full.values())
