"""Our Llama / Mistral / Qwen2 against transformers (the reference) on fresh random inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from architectures import llama, qwen2, register_builtin
from registry import InvalidConfig, InvalidRequest, KvCacheOptions, LoadOptions, ModelRegistry
from tests.tiny_models import make_hf_model, save_hf_model

CPU = torch.device("cpu")
BUILDERS = {"llama": llama.build, "mistral": llama.build, "qwen2": qwen2.build}

CASES = {
    "llama-gqa-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama-llama3-rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
    ),
    "llama-yarn-rope": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64
            )
        ),
    ),
    "llama-linear-rope": (
        "llama",
        dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ),
    "llama-mha-bias": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "qwen2-bias": ("qwen2", dict()),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=12, max_window_layers=1)),
    "mistral-window": ("mistral", dict(sliding_window=12)),
}


def build(arch: str, model_dir: Path, **kv) -> object:
    kv.setdefault("max_batch_size", 3)
    kv.setdefault("max_seq_len", 64)
    return BUILDERS[arch](model_dir, CPU, LoadOptions(kv_cache=KvCacheOptions(**kv)))


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, our model, arch) for one case, saved and loaded through safetensors."""
    arch, overrides = CASES[request.param]
    ref = make_hf_model(arch, seed=len(request.param), **overrides)
    model_dir = save_hf_model(ref, tmp_path_factory.mktemp(request.param))
    return ref, build(arch, model_dir), arch


def test_forward_matches_transformers(pair, seed):
    ref, ours, _ = pair
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (3, 36), generator=gen)  # 3x the 12-token windows
    with torch.no_grad():
        expected = ref(ids).logits
    got = ours.forward(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-4, f"seed {seed}: max abs diff {diff}"
    last = ours.forward(ids, all_logits=False)
    torch.testing.assert_close(last, got[:, -1], rtol=0, atol=1e-5)


def test_incremental_decoding_matches_full_forward(pair, seed):
    ref, ours, _ = pair
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (2, 30), generator=gen)
    with torch.no_grad():
        expected = ref(ids).logits
    ours.reset_kv_cache()
    prefill = ours.forward_with_cache(ids[:, :10], 0, 10)
    assert (prefill - expected[:, :10]).abs().max() <= 1e-4
    for t in range(10, 30):
        step = ours.forward_with_cache(ids[:, t : t + 1], t, 1)
        diff = (step[:, 0] - expected[:, t]).abs().max().item()
        assert diff <= 1e-4, f"seed {seed}: step {t} max abs diff {diff}"


def test_rewind_equals_fresh_run(pair, seed):
    _, ours, _ = pair
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (1, 24), generator=gen)
    other = torch.randint(0, ours.config.vocab_size, (1, 8), generator=gen)
    ours.reset_kv_cache()
    ours.forward_with_cache(ids[:, :16], 0, 16)
    ours.forward_with_cache(other, 16, 8)  # a branch the scheduler abandons
    rewound = ours.forward_with_cache(ids[:, 16:], 16, 8)  # write again at 16
    ours.reset_kv_cache()
    fresh = ours.forward_with_cache(ids, 0, 24)[:, 16:]
    torch.testing.assert_close(rewound, fresh, rtol=0, atol=1e-5)


def test_batch_rows_are_independent(pair, seed):
    _, ours, _ = pair
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (3, 12), generator=gen)
    together = ours.forward(ids)
    for row in range(3):
        alone = ours.forward(ids[row : row + 1])
        torch.testing.assert_close(together[row : row + 1], alone, rtol=0, atol=1e-5)


def test_slice_kv_cache_equals_transformers_cache(pair, seed):
    ref, ours, _ = pair
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, ours.config.vocab_size, (2, 20), generator=gen)
    with torch.no_grad():
        cache = ref(ids, use_cache=True).past_key_values
    ours.reset_kv_cache()
    ours.forward_with_cache(ids, 0, 20)
    for layer in range(ours.config.num_hidden_layers):
        k, v = ours.slice_kv_cache(layer, 0, 20)
        ref_k, ref_v = cache.layers[layer].keys, cache.layers[layer].values
        assert k.shape == (3, ours.config.num_key_value_heads, 20, ours.config.head_dim)  # all cache rows
        # transformers keeps only the last window - 1 tokens of a sliding layer; compare what it keeps
        kept = ref_k.shape[2]
        torch.testing.assert_close(k[:2, :, 20 - kept :], ref_k, rtol=0, atol=1e-5)
        torch.testing.assert_close(v[:2, :, 20 - kept :], ref_v, rtol=0, atol=1e-5)
        k_tail, _ = ours.slice_kv_cache(layer, 13, 7)
        torch.testing.assert_close(k_tail[:2], ref_k[:, :, kept - 7 :], rtol=0, atol=1e-5)


def test_sliding_window_is_exercised(tmp_path, seed):
    """The window cases above would pass vacuously if the window were ignored everywhere."""
    ref = make_hf_model("mistral", sliding_window=8)
    windowed = build("mistral", save_hf_model(ref, tmp_path / "w"))
    ref.config.sliding_window = None
    full_dir = save_hf_model(ref, tmp_path / "f")
    full = build("mistral", full_dir)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(seed))
    a, b = windowed.forward(ids), full.forward(ids)
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-5)  # inside the window: identical
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_sharded_checkpoint_loads_identically(tmp_path, seed):
    ref = make_hf_model("llama", num_hidden_layers=3)
    single = build("llama", save_hf_model(ref, tmp_path / "single"))
    sharded_dir = save_hf_model(ref, tmp_path / "sharded", max_shard_size="60KB")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 2
    sharded = build("llama", sharded_dir)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(single.forward(ids), sharded.forward(ids))


def test_dynamic_rope_extends_positions(tmp_path, seed):
    rope = dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)
    ref = make_hf_model("llama", rope_parameters=rope, max_position_embeddings=32)
    ours = build("llama", save_hf_model(ref, tmp_path / "m"), max_seq_len=64)
    assert ours.config.position_limit == 64
    ids = torch.randint(0, 128, (1, 48), generator=torch.Generator().manual_seed(seed))  # beyond 32
    with torch.no_grad():
        expected = ref(ids).logits
    assert (ours.forward(ids) - expected).abs().max() <= 1e-4


def test_bfloat16_follows_float32(tmp_path, seed):
    ref = make_hf_model("llama")
    model_dir = save_hf_model(ref, tmp_path / "m")
    fp32 = build("llama", model_dir)
    bf16 = BUILDERS["llama"](model_dir, CPU, LoadOptions(dtype=torch.bfloat16))
    assert bf16.dtype == torch.bfloat16 and bf16.weight_bytes * 2 == fp32.weight_bytes
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(seed))
    a, b = fp32.forward(ids), bf16.forward(ids)
    assert b.dtype == torch.float32  # logits come back in float32
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_metadata(tmp_path):
    ref = make_hf_model("llama", tie_word_embeddings=True)
    ours = build("llama", save_hf_model(ref, tmp_path / "m"), max_batch_size=2, max_seq_len=32)
    unique = {id(p): p for p in ref.parameters()}
    assert ours.num_parameters == sum(p.numel() for p in unique.values())
    assert ours.weight_bytes == 4 * ours.num_parameters
    spec = ours.cache_spec
    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, float32
    assert spec.contiguous_bytes == 2 * 32 * per_token
    assert spec.paged_bytes == spec.num_blocks * spec.block_size * per_token
    assert ours.device_type == "cpu" and ours.attention_backend == "torch"
    freed = ours.release()
    assert freed == ours.weight_bytes + spec.total_bytes
    with pytest.raises(InvalidRequest, match="released"):
        ours.forward(torch.zeros(1, 1, dtype=torch.long))


def _cache_snapshot(model) -> list[torch.Tensor]:
    return [t.clone() for t in model.contiguous.k + model.contiguous.v]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda m: m.forward(torch.tensor([[1, 2, 128]])),
            r"input_ids\[0, 2\] = 128 is outside the vocabulary",
        ),
        (lambda m: m.forward(torch.tensor([[1, -1]])), r"input_ids\[0, 1\] = -1"),
        (lambda m: m.forward(torch.zeros(1, 0, dtype=torch.long)), "input_ids is empty"),
        (lambda m: m.forward(torch.tensor([1, 2])), r"must be \[batch, seq\]"),
        (lambda m: m.forward(torch.tensor([[1.0, 2.0]])), "must hold integers"),
        (
            lambda m: m.forward(torch.tensor([[1, 2]]), torch.tensor([[0, 256]])),
            r"positions\[0, 1\] = 256 is outside \[0, 256\)",
        ),
        (lambda m: m.forward(torch.tensor([[1, 2]]), torch.tensor([[0]])), "positions has shape"),
        (lambda m: m.forward_with_cache(torch.tensor([[1, 2]]), 63, 2), "exceeds the cache's max_seq_len 64"),
        (
            lambda m: m.forward_with_cache(torch.tensor([[1]]), 10, 1),
            "leaves a gap in cache row 0, which holds 4",
        ),
        (
            lambda m: m.forward_with_cache(torch.ones(4, 1, dtype=torch.long), 0, 1),
            r"batch 4 is outside the cache's rows \[1, 3\]",
        ),
        (lambda m: m.forward_with_cache(torch.tensor([[1, 2]]), 0, 3), "seq_len 3 does not match"),
        (lambda m: m.forward_with_cache(torch.tensor([[1, 200]]), 4, 2), "outside the vocabulary"),
        (lambda m: m.slice_kv_cache(2, 0, 1), r"layer_idx 2 is outside \[0, 2\)"),
        (lambda m: m.slice_kv_cache(0, 60, 5), "exceeds the cache's max_seq_len"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(tmp_path_factory, call, message):
    model_dir = tmp_path_factory.getbasetemp() / "validation-model"
    if not model_dir.exists():
        save_hf_model(make_hf_model("llama"), model_dir)
    ours = build("llama", model_dir)
    ours.forward_with_cache(torch.randint(0, 128, (1, 4)), 0, 4)
    before = _cache_snapshot(ours)
    with pytest.raises(InvalidRequest, match=message):
        call(ours)
    after = _cache_snapshot(ours)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert ours.contiguous.filled[0] == 4


def test_unsupported_configs_fail_the_load(tmp_path):
    import json

    model_dir = save_hf_model(make_hf_model("llama"), tmp_path / "m")
    config = json.loads((model_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "mrope", "rope_theta": 10000.0}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidConfig, match="'mrope' is not supported"):
        build("llama", model_dir)
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}  # without its factors
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidConfig, match="rope_parameters.short_factor must be a non-empty list"):
        build("llama", model_dir)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidConfig, match="quant_method .bitsandbytes. is not supported"):
        build("llama", model_dir)


def test_registry_loads_builtin_architectures(tmp_path, seed):
    registry = ModelRegistry(device="cpu", model_roots=[tmp_path])
    register_builtin(registry)
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"} <= set(
        registry.list_architectures()
    )
    ref = make_hf_model("qwen2")
    save_hf_model(ref, tmp_path / "qwen")
    assert registry.load_model_auto("q", "qwen") == "Qwen2ForCausalLM"
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(seed))
    with registry.get_model_mut("q") as model, torch.no_grad():
        assert (model.forward(ids) - ref(ids).logits).abs().max() <= 1e-4
    assert registry.unload_model("q") > 0
    assert registry.list_models() == []
