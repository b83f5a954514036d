"""LoadOptions.compile_decode: single-sequence decode steps of forward_with_cache through
torch.compile equal transformers (fp32, 1e-4) for Llama and Gemma 2 (softcaps, sandwich norms, a
sliding window), reuse the one graph compiled at Load for every later position,
and are refused where they cannot apply."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import architectures
from architectures.compiled_decode import FIRST_COMPILED_POSITION, check_compilable
from registry import InvalidConfig, KvCacheOptions, LoadOptions, ModelRegistry
from tests.compiler import can_compile
from tests.tiny_models import make_hf_model, save_hf_model

from .test_new_architectures import ARCHS, BASE, make_reference

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not can_compile(),
    reason="torch.compile needs a C++ compiler (g++ or $CXX) and Python's headers",
)

TOL = 1e-4
KV = KvCacheOptions(block_size=4, num_blocks=16, max_seq_len=48, max_batch_size=2)


def _registry(root: Path) -> ModelRegistry:
    reg = ModelRegistry(device="cpu", model_roots=[root])
    architectures.register_builtin(reg)
    return reg


def _load(
    reg: ModelRegistry, model_id: str, model_dir: Path, compile_decode: bool = True, cpu_gemm: str = "auto"
):
    options = LoadOptions(kv_cache=KV, compile_decode=compile_decode, cpu_gemm=cpu_gemm)
    return reg.load(model_id, model_dir, options=options).entry.model


def _reference(name: str):
    if name == "LlamaForCausalLM":
        return make_hf_model("llama", seed=3)
    return make_reference(ARCHS[name], seed=300)


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(
    ("name", "cpu_gemm"),
    [
        ("LlamaForCausalLM", "auto"),
        ("Gemma2ForCausalLM", "auto"),
        ("LlamaForCausalLM", "onednn"),
        ("LlamaForCausalLM", "mv+torch"),
    ],
)
def test_compiled_decode_steps_match_transformers(
    tmp_path: Path, name: str, cpu_gemm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onednn and mv: their matmuls are opaque ops in the graph (architectures/cpu_gemm.py), here in
    every layer (the tiny model's layers are all below the size from which they are used)."""
    monkeypatch.setattr(architectures.cpu_gemm, "KERNEL_MIN_WEIGHT", 0)
    ref = _reference(name)
    model_dir = save_hf_model(ref, tmp_path / name)
    model = _load(_registry(tmp_path), "compiled", model_dir, cpu_gemm=cpu_gemm)
    assert model.compiled_decode is not None and model.compile_seconds > 0
    if cpu_gemm != "auto":
        assert model.network.lm_head.gemm is architectures.cpu_gemm.kernel(cpu_gemm)
    vocab = ref.config.vocab_size
    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(3, vocab, (1, 30), generator=gen)
    worst = 0.0

    def check(logits: torch.Tensor, seq: torch.Tensor) -> None:
        nonlocal worst
        with torch.no_grad():
            want = ref(seq).logits.float()[:, -logits.shape[1] :]
        worst = max(worst, float((logits - want).abs().max()))

    graphs = _graphs()
    # positions 0 and 1 run eagerly, 2.. through the graph compiled at Load (windows of 5 included)
    check(model.forward_with_cache(tokens[:, :1], 0, 1), tokens[:, :1])
    for pos in range(1, 20):
        check(model.forward_with_cache(tokens[:, pos : pos + 1], pos, 1), tokens[:, : pos + 1])
    # a rewind, a prefill chunk (eager), then decode again
    check(model.forward_with_cache(tokens[:, 8:9], 8, 1), tokens[:, :9])
    check(model.forward_with_cache(tokens[:, 9:25], 9, 16), tokens[:, :25])
    for pos in range(25, 30):
        check(model.forward_with_cache(tokens[:, pos : pos + 1], pos, 1), tokens[:, : pos + 1])
    assert worst <= TOL, f"{name}: compiled decode differs from transformers by {worst}"
    assert _graphs() == graphs, "a decode step compiled a new graph after Load"


def test_batches_and_the_first_positions_run_eagerly_and_equal_the_compiled_model(tmp_path: Path) -> None:
    model_dir = save_hf_model(make_hf_model("llama", seed=4), tmp_path / "llama")
    reg = _registry(tmp_path)
    compiled, eager = _load(reg, "compiled", model_dir), _load(reg, "eager", model_dir, compile_decode=False)
    assert eager.compiled_decode is None and eager.compile_seconds == 0
    applies = compiled.compiled_decode.applies
    assert applies(1, 1, FIRST_COMPILED_POSITION) and applies(1, 1, 47)
    assert not applies(2, 1, 10) and not applies(1, 2, 10) and not applies(1, 1, FIRST_COMPILED_POSITION - 1)
    tokens = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    graphs = _graphs()
    for model in (compiled, eager):
        model.forward_with_cache(tokens[:, :6], 0, 6)
    for pos in range(6, 12):  # batch 2: eager in both
        a = compiled.forward_with_cache(tokens[:, pos : pos + 1], pos, 1)
        b = eager.forward_with_cache(tokens[:, pos : pos + 1], pos, 1)
        assert torch.equal(a, b)
    assert _graphs() == graphs


def test_a_second_load_of_the_same_shapes_reuses_the_compiled_code_and_unload_frees_the_weights(
    tmp_path: Path,
) -> None:
    model_dir = save_hf_model(make_hf_model("llama", seed=6), tmp_path / "llama")
    reg = _registry(tmp_path)
    first = _load(reg, "first", model_dir)
    graphs = _graphs()
    second = _load(reg, "second", model_dir)
    assert _graphs() == graphs, "the second Load compiled again"
    weight = weakref.ref(first.network.model.layers[0].mlp.down_proj.weight)
    reg.unload_model("first")
    del first
    gc.collect()
    assert weight() is None, "the compiled code keeps an unloaded model's weights alive"
    tokens = torch.randint(3, 100, (1, 4), generator=torch.Generator().manual_seed(7))
    second.forward_with_cache(tokens[:, :3], 0, 3)
    assert torch.isfinite(second.forward_with_cache(tokens[:, 3:], 3, 1)).all()


def test_moe_networks_are_refused_before_any_weight_is_read(tmp_path: Path) -> None:
    ref = make_reference(ARCHS["MixtralForCausalLM"], seed=301)
    model_dir = save_hf_model(ref, tmp_path / "mixtral")
    with pytest.raises(InvalidConfig, match="compile_decode does not support MixtralForCausalLM: its MoE"):
        _load(_registry(tmp_path), "moe", model_dir)


def test_cuda_and_tensor_parallel_loads_are_refused() -> None:
    config = type("Config", (), {"architecture": "LlamaForCausalLM"})()
    network = torch.nn.Module()
    with pytest.raises(InvalidConfig, match=r"compile_decode is for CPU models \(this Load is on cuda:0\)"):
        check_compilable(config, torch.device("cuda:0"), network, tensor_parallel=False)
    with pytest.raises(InvalidConfig, match="does not support tensor parallelism"):
        check_compilable(config, torch.device("cpu"), network, tensor_parallel=True)
    check_compilable(config, torch.device("cpu"), network, tensor_parallel=False)


assert BASE["vocab_size"] > 3  # the token draws above start at 3 (special ids below)
