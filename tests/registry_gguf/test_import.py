"""GGUF import of tiny files written by the tests: weights, config and logits against independent
references (the HF model the file was made from, hand-written dequantization, transformers' own
dequantizer and GGUF loader)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from architectures import llama, qwen2
from registry import KvCacheOptions, LoadOptions
from registry.gguf_import import import_gguf
from registry.safetensors_loader import index_checkpoint
from tests.registry_gguf.gguf_files import (
    gguf_tensors_of,
    llama_cpp_permute,
    q8_0_reference,
    quantized,
    random_blocks,
    rope_theta,
    transformers_dequantize,
    write_gguf,
    write_model_gguf,
)
from tests.tiny_models import make_hf_model

Q = gguf.GGMLQuantizationType
BUILDERS = {"llama": llama.build, "mistral": llama.build, "qwen2": qwen2.build}
OPTIONS = LoadOptions(kv_cache=KvCacheOptions(max_seq_len=64, max_batch_size=1))


@pytest.fixture
def seed() -> int:
    return random.randrange(2**31)


def read_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an imported directory, read with the safetensors library (an independent reader)."""
    out = {}
    for entry in {e.file for e in index_checkpoint(model_dir).values()}:
        with safe_open(str(entry), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def to_gguf_layout(name: str, tensor: torch.Tensor, config, arch: str) -> np.ndarray:
    """An imported HF tensor put back into llama.cpp's layout with llama.cpp's own permutation
    (llama-architecture files only: llama.cpp stores Qwen2 unpermuted)."""
    data = tensor.float().numpy()
    if arch == "qwen2":
        return data
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
    return data


def from_gguf_layout(name: str, data: np.ndarray, config, arch: str) -> np.ndarray:
    """The inverse of llama.cpp's permutation, found by permuting row indices (not by our code)."""
    if arch == "qwen2":
        return data
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for proj, n_kv in heads.items():
        if f".{proj}." in name:
            order = llama_cpp_permute(np.arange(data.shape[0]), config.num_attention_heads, n_kv)
            return data[np.argsort(order)]
    return data


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("arch", "overrides", "architecture"),
    [
        ("llama", {}, "LlamaForCausalLM"),
        ("llama", {"tie_word_embeddings": True, "rope_theta": 50000.0}, "LlamaForCausalLM"),
        ("qwen2", {}, "Qwen2ForCausalLM"),
        ("mistral", {"head_dim": 32}, "MistralForCausalLM"),
    ],
)
def test_f32_round_trip_restores_the_hf_model_exactly(tmp_path, seed, arch, overrides, architecture):
    import transformers

    model = make_hf_model(arch, seed=seed, **overrides)
    name = "Mistral tiny" if arch == "mistral" else "tiny"
    src = write_model_gguf(tmp_path / "m.gguf", model, arch, name=name)
    out = import_gguf(src, tmp_path / "out")

    # Weights: bit-identical to the HF model the file was made from (Q/K permutation undone).
    ours = read_dir(out)
    expected = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    assert sorted(ours) == sorted(expected), f"seed {seed}"
    for key, value in expected.items():
        assert torch.equal(ours[key], value), f"{key} differs (seed {seed})"

    # config.json: what transformers and our registry read back.
    cfg = json.loads((out / "config.json").read_text())
    hf = model.config
    assert cfg["architectures"] == [architecture]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert cfg[key] == getattr(hf, key), key
    assert cfg["rope_theta"] == rope_theta(hf)
    assert math.isclose(cfg["rms_norm_eps"], hf.rms_norm_eps, rel_tol=1e-6)
    hf_head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]) == hf_head_dim

    # transformers loading our directory computes what the original model computes...
    ids = torch.randint(0, hf.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == architecture
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)
    # ...and so does our own architecture loading it.
    built = BUILDERS[arch](out, torch.device("cpu"), OPTIONS)
    diff = (built.forward(ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff} (seed {seed})"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_import_equals_hand_dequantization_and_transformers_gguf_loader(tmp_path, seed, arch):
    import transformers

    model = make_hf_model(arch, seed=seed)
    payload = quantized(gguf_tensors_of(model, arch), Q.Q8_0)
    src = write_gguf(tmp_path / "m.gguf", model.config, arch, payload)
    out = import_gguf(src, tmp_path / "out")
    ours = read_dir(out)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)

    # Every tensor, put back in llama.cpp's layout, equals Q8_0 dequantized by hand (exactly).
    reference_state = {}
    for hf_name, value in ours.items():
        base, suffix = hf_name.rsplit(".", 1)
        stored = payload[f"{name_map.get_name(base)}.{suffix}"]
        ref = q8_0_reference(stored[0], value.shape) if isinstance(stored, tuple) else stored
        np.testing.assert_array_equal(
            to_gguf_layout(hf_name, value, model.config, arch), ref, err_msg=hf_name
        )
        reference_state[hf_name] = torch.from_numpy(from_gguf_layout(hf_name, ref, model.config, arch))

    # The reference model: the original with its weights replaced by the hand dequantization.
    model.load_state_dict(reference_state, strict=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(seed))
    built = BUILDERS[arch](out, torch.device("cpu"), OPTIONS)
    diff = (built.forward(ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff} (seed {seed})"

    # transformers reading the same GGUF (its own mapping and un-permutation) agrees tensor by tensor.
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32
    )
    oracle_state = oracle.state_dict()
    for hf_name, value in ours.items():
        assert torch.equal(value, oracle_state[hf_name]), hf_name


ALL_TYPES = [
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
]


def test_every_quantization_type_matches_transformers_dequantizer(tmp_path, seed):
    """Random blocks of each type (K-quants need rows of 256), dequantized by us through gguf.quants
    and, independently, by transformers' torch dequantizer."""
    pytest.importorskip("transformers.integrations.gguf.dequant")
    rng = np.random.default_rng(seed)
    model = make_hf_model(
        "llama", seed=seed, vocab_size=256, hidden_size=256, intermediate_size=256, num_attention_heads=4
    )
    tensors = gguf_tensors_of(model, "llama")
    payload: dict[str, object] = {}
    expected: dict[str, tuple[str, np.ndarray]] = {}
    two_d = [name for name, data in tensors.items() if data.ndim == 2]
    assert len(two_d) >= len(ALL_TYPES)
    for i, name in enumerate(two_d):
        type_name = ALL_TYPES[i % len(ALL_TYPES)]
        data = tensors[name]
        if type_name == "F16":
            payload[name] = data.astype(np.float16)
            expected[name] = (type_name, data.astype(np.float16).astype(np.float32))
        elif type_name == "BF16":
            raw = gguf.quants.quantize(data, Q.BF16)
            payload[name] = (raw, Q.BF16)
            bits = raw.view(np.uint16).astype(np.uint32) << 16  # bfloat16 is the top half of a float32
            expected[name] = (type_name, bits.view(np.float32).reshape(data.shape))
        else:
            raw = random_blocks(rng, type_name, data.shape)
            payload[name] = (raw, Q[type_name])
            expected[name] = (type_name, transformers_dequantize(raw, type_name, data.shape))
    payload.update({name: data for name, data in tensors.items() if data.ndim == 1})
    src = write_gguf(tmp_path / "m.gguf", model.config, "llama", payload)
    ours = read_dir(import_gguf(src, tmp_path / "out"))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    seen = set()
    for hf_name, value in ours.items():
        base, suffix = hf_name.rsplit(".", 1)
        key = f"{name_map.get_name(base)}.{suffix}"
        if key not in expected:
            continue
        type_name, ref = expected[key]
        assert np.isfinite(ref).all(), type_name
        got = to_gguf_layout(hf_name, value, model.config, "llama")
        np.testing.assert_allclose(
            got, ref, rtol=1e-6, atol=1e-6, err_msg=f"{key} ({type_name}), seed {seed}"
        )
        seen.add(type_name)
    assert seen == set(ALL_TYPES)


def test_bfloat16_and_sharding(tmp_path, seed):
    model = make_hf_model("qwen2", seed=seed)
    src = write_model_gguf(tmp_path / "m.gguf", model, "qwen2")
    out = import_gguf(src, tmp_path / "out", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for shard in shards:  # each under the limit unless it holds a single larger tensor
        with safe_open(str(out / shard), "pt") as f:
            keys = list(f.keys())
        assert (out / shard).stat().st_size <= 40_000 + 4096 or len(keys) == 1
    assert not (out / "model.safetensors").exists()
    ours = read_dir(out)
    state = model.state_dict()
    assert set(index["weight_map"]) == set(ours) == set(state)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in ours.values())
    for key, value in ours.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, state[key].to(torch.bfloat16)), key
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    # The registry's loader reads the sharded directory too.
    built = qwen2.build(out, torch.device("cpu"), OPTIONS)
    assert built.dtype == torch.float32  # CPU default; weights upcast on load
    ids = torch.randint(0, 128, (1, 8))
    ref = model.to(torch.bfloat16).float()
    diff = (built.forward(ids) - logits(ref, ids)).abs().max().item()
    assert diff <= 1e-4, diff


def llama3_rope_freqs(theta: float, dim: int, scaling: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3 (as written there)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, seed):
    import transformers

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    # head_dim 64 and theta 500000 as in Llama 3: several frequencies fall in the smoothed band.
    model = make_hf_model(
        "llama",
        seed=seed,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    tensors = gguf_tensors_of(model, "llama")
    tensors["rope_freqs.weight"] = llama3_rope_freqs(500000.0, 64, scaling)
    out = import_gguf(write_gguf(tmp_path / "m.gguf", model.config, "llama", tensors), tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in read_dir(out)
    ids = torch.randint(0, 128, (1, 10))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_rope_scaling_metadata(tmp_path, seed):
    import transformers

    model = make_hf_model(
        "llama", seed=seed, rope_parameters={"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}
    )

    def linear(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    out = import_gguf(write_model_gguf(tmp_path / "a.gguf", model, "llama", metadata=linear), tmp_path / "a")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "linear",
        "factor": 4.0,
    }
    ids = torch.randint(0, 128, (1, 10))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=1e-5, rtol=0)

    def yarn(w: gguf.GGUFWriter) -> None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)

    plain = make_hf_model("qwen2", seed=seed)
    out = import_gguf(write_model_gguf(tmp_path / "b.gguf", plain, "qwen2", metadata=yarn), tmp_path / "b")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    qwen2.build(out, torch.device("cpu"), OPTIONS)  # our config parser and rope accept it


def test_no_tokenizer_in_file_means_no_tokenizer_files(tmp_path):
    model = make_hf_model("llama", seed=1)
    out = import_gguf(write_model_gguf(tmp_path / "m.gguf", model, "llama"), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "gguf_import.json", "model.safetensors"]
    marker = json.loads((out / "gguf_import.json").read_text())
    assert marker["tokenizer"] == "the GGUF file has no tokenizer"
    assert marker["source"]["size"] == (tmp_path / "m.gguf").stat().st_size


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte → printable character table (the spelling of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def add_byte_level_tokenizer(model_kind: str):
    """Metadata of a tiny GPT-2-style tokenizer: 256 byte tokens, two merges, an end-of-text token."""

    def add(w: gguf.GGUFWriter) -> None:
        tokens = [*byte_level_alphabet(), "Ġt", "Ġth", "<|endoftext|>"]
        w.add_tokenizer_model(model_kind)
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * 258 + [3])
        w.add_token_merges(["Ġ t", "Ġt h"])
        w.add_eos_token_id(258)

    return add


def test_tokenizer_files_from_the_gguf_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer

    model = make_hf_model("llama", seed=2, vocab_size=259)
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    # A decoy next to the file: the tokenizer must come from the GGUF, not from this.
    (src_dir / "tokenizer.json").write_text("{}")
    src = write_model_gguf(src_dir / "m.gguf", model, "llama", metadata=add_byte_level_tokenizer("gpt2"))
    out = import_gguf(src, tmp_path / "out", progress=True)
    # the bar is followed by a line for the tokenizer step, which has no bar of its own
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert (
        "100.0%" in lines[-2]
        and lines[-1] == "converting the tokenizer with transformers (slower than the weights)..."
    )
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 258
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode(" the").ids == [257, ord("e")]  # "Ġth" merged; token i < 256 is byte i
    assert tok.encode("a<|endoftext|>").ids == [ord("a"), 258]
    assert tok.decode([257, ord("e")]) == " the"
    marker = json.loads((out / "gguf_import.json").read_text())
    assert marker["tokenizer"].startswith("tokenizer converted by transformers")
    assert "tokenizer.json" in marker["files"]

    # A tokenizer transformers cannot convert: the weights are imported, the note says why.
    bad = write_model_gguf(
        tmp_path / "bad.gguf", model, "llama", metadata=add_byte_level_tokenizer("klingon")
    )
    out = import_gguf(bad, tmp_path / "out2")
    marker = json.loads((out / "gguf_import.json").read_text())
    assert marker["tokenizer"].startswith("transformers could not convert the GGUF tokenizer"), marker
    assert "\n" not in marker["tokenizer"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "gguf_import.json", "model.safetensors"]
