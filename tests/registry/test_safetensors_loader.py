"""The strict safetensors loader and the Llama-style weight mapping, on checkpoints written here."""

from __future__ import annotations

import json
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from architectures.llama import LlamaForCausalLM
from registry import (
    CorruptCheckpoint,
    FusedPart,
    InvalidArgument,
    ModelWorkerError,
    UnsafeCheckpoint,
    WeightMapping,
    WeightsMismatch,
    WeightTarget,
)
from registry.safetensors_loader import (
    INDEX_FILE,
    checkpoint_files,
    estimate_weight_bytes,
    index_checkpoint,
    load_weights,
)

LLAMA_STYLE_MAPPING = LlamaForCausalLM.weight_mapping

# Sizes: hidden 8, 4 query heads and 2 kv heads of head_dim 2, MLP 12, vocab 16, 2 layers.
H, Q, KV, FF, V, L = 8, 8, 4, 12, 16, 2


class RMSNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))


class Attention(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(H, Q + 2 * KV, bias=bias)
        self.qkv_proj.shard_sizes = (Q, KV, KV)  # type: ignore[assignment]
        self.o_proj = nn.Linear(Q, H, bias=False)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(H, 2 * FF, bias=False)
        self.gate_up_proj.shard_sizes = (FF, FF)  # type: ignore[assignment]
        self.down_proj = nn.Linear(FF, H, bias=False)


class Layer(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.self_attn = Attention(bias)
        self.mlp = MLP()
        self.input_layernorm = RMSNorm(H)
        self.post_attention_layernorm = RMSNorm(H)


class Inner(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.layers = nn.ModuleList(Layer(bias) for _ in range(L))
        self.norm = RMSNorm(H)


class TinyLlama(nn.Module):
    """The parameter layout of a Llama ForCausalLM with fused projections, at toy sizes."""

    def __init__(self, tied: bool = False, bias: bool = False, lm_head_first: bool = False) -> None:
        super().__init__()
        if lm_head_first:  # registration order decides which tied name comes first
            self.lm_head = nn.Linear(H, V, bias=False)
            self.model = Inner(bias)
        else:
            self.model = Inner(bias)
            self.lm_head = nn.Linear(H, V, bias=False)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        with torch.no_grad():  # a sentinel that no real tensor equals, so an unloaded value shows
            for p in self.parameters():
                p.fill_(-1234.0)


def hf_tensors(
    seed: int, dtype: torch.dtype = torch.float32, tied: bool = False, bias: bool = False
) -> dict[str, torch.Tensor]:
    """A checkpoint in the transformers Llama naming, with fresh random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    t = {"model.embed_tokens.weight": r(V, H), "model.norm.weight": r(H)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {
            p + "self_attn.q_proj.weight": r(Q, H),
            p + "self_attn.k_proj.weight": r(KV, H),
            p + "self_attn.v_proj.weight": r(KV, H),
            p + "self_attn.o_proj.weight": r(H, Q),
            p + "mlp.gate_proj.weight": r(FF, H),
            p + "mlp.up_proj.weight": r(FF, H),
            p + "mlp.down_proj.weight": r(H, FF),
            p + "input_layernorm.weight": r(H),
            p + "post_attention_layernorm.weight": r(H),
            p + "self_attn.rotary_emb.inv_freq": r(Q // 8),
        }
        if bias:
            t |= {p + f"self_attn.{n}_proj.bias": r(s) for n, s in (("q", Q), ("k", KV), ("v", KV))}
    if not tied:
        t["lm_head.weight"] = r(V, H)
    return t


def write_single(tensors: dict[str, torch.Tensor], d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    return d


def write_sharded(tensors: dict[str, torch.Tensor], d: Path, shards: int = 3, seed: int = 0) -> Path:
    """Random assignment of tensors to shard files, described by a hand-written index."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {n: names[rng.randrange(shards)] for n in tensors}
    for shard in names:
        part = {n: t for n, t in tensors.items() if weight_map[n] == shard}
        save_file(part, str(d / shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (d / INDEX_FILE).write_text(json.dumps(index))
    return d


def expected_parameters(
    t: dict[str, torch.Tensor], tied: bool = False, bias: bool = False
) -> dict[str, torch.Tensor]:
    """What each fused parameter must hold, assembled independently of the loader."""
    e = {
        "model.embed_tokens.weight": t["model.embed_tokens.weight"],
        "model.norm.weight": t["model.norm.weight"],
    }
    for i in range(L):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        e[a + "qkv_proj.weight"] = torch.cat(
            [t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]
        )
        if bias:
            e[a + "qkv_proj.bias"] = torch.cat(
                [t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]]
            )
        e[a + "o_proj.weight"] = t[a + "o_proj.weight"]
        e[m + "gate_up_proj.weight"] = torch.cat([t[m + "gate_proj.weight"], t[m + "up_proj.weight"]])
        e[m + "down_proj.weight"] = t[m + "down_proj.weight"]
        for n in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            e[p + n] = t[p + n]
    e["lm_head.weight"] = t["model.embed_tokens.weight"] if tied else t["lm_head.weight"]
    return e


def assert_loaded(module: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = dict(module.named_parameters(remove_duplicate=False))
    assert set(state) == set(expected)
    for name, value in expected.items():
        got = state[name]
        assert got.dtype == next(module.parameters()).dtype, name
        assert torch.equal(got, value.to(got.dtype)), name


# -- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("bias", [False, True])
def test_load_exact_values_and_fused_rows(tmp_path: Path, layout: str, bias: bool) -> None:
    tensors = hf_tensors(seed=11 + bias, bias=bias)
    d = (write_single if layout == "single" else write_sharded)(tensors, tmp_path / "m")
    if layout == "sharded":
        assert len(checkpoint_files(d)) == 3
    module = TinyLlama(bias=bias)
    read = load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(tensors, bias=bias))
    # Every tensor but the ignored inv_freq was read exactly once.
    assert read == sum(t.nbytes for n, t in tensors.items() if not n.endswith("inv_freq"))
    # Spot-check the fused rows explicitly: k lives in rows [Q, Q+KV) of qkv, up in rows [FF, 2*FF) of gate_up.
    attn = module.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(attn[Q : Q + KV], tensors["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(attn[Q + KV :], tensors["model.layers.1.self_attn.v_proj.weight"])
    up = module.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(up[FF:], tensors["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize(
    ("saved", "target"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float16),
    ],
)
def test_load_converts_to_the_module_dtype(tmp_path: Path, saved: torch.dtype, target: torch.dtype) -> None:
    tensors = hf_tensors(seed=3, dtype=saved)
    d = write_sharded(tensors, tmp_path / "m", shards=2, seed=5)
    module = TinyLlama().to(target)
    load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert all(p.dtype == target for p in module.parameters())
    assert_loaded(module, expected_parameters(tensors))  # compares with saved.to(target): one rounding


def test_load_matches_a_checkpoint_written_by_transformers(tmp_path: Path) -> None:
    """save_pretrained (sharded) is an independent writer; the module must hold HF's state_dict."""
    from tests.tiny_models import make_hf_model, save_hf_model

    hf = make_hf_model(
        "llama", seed=7, hidden_size=H, intermediate_size=FF, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=L, vocab_size=V, head_dim=2,
    )  # fmt: skip
    d = save_hf_model(hf, tmp_path / "hf", max_shard_size="2KB")
    assert (d / INDEX_FILE).is_file() and len(checkpoint_files(d)) > 1
    module = TinyLlama()
    load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(hf.state_dict()))


# -- tied embeddings ---------------------------------------------------------------------------


@pytest.mark.parametrize("lm_head_first", [False, True])
def test_tied_lm_head_absent(tmp_path: Path, lm_head_first: bool) -> None:
    tensors = hf_tensors(seed=21, tied=True)
    assert "lm_head.weight" not in tensors
    module = TinyLlama(tied=True, lm_head_first=lm_head_first)
    load_weights(module, write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(tensors, tied=True))
    assert module.lm_head.weight is module.model.embed_tokens.weight


def test_tied_lm_head_present_is_accepted(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=22, tied=True)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    module = TinyLlama(tied=True)
    load_weights(module, write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(tensors, tied=True))


def test_tied_only_lm_head_present_fills_the_embedding(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=23, tied=True)
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    module = TinyLlama(tied=True)
    load_weights(module, write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)
    assert torch.equal(module.model.embed_tokens.weight, tensors["lm_head.weight"])


def test_tied_alias_with_the_wrong_shape_is_reported(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=24, tied=True)
    tensors["lm_head.weight"] = torch.zeros(V + 1, H)
    with pytest.raises(WeightsMismatch, match=r"lm_head\.weight is \[17, 8\]"):
        load_weights(TinyLlama(tied=True), write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)


def test_tied_both_absent_is_missing(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=25, tied=True)
    del tensors["model.embed_tokens.weight"]
    with pytest.raises(WeightsMismatch) as info:
        load_weights(TinyLlama(tied=True), write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)
    assert info.value.missing == ["model.embed_tokens.weight (or tied lm_head.weight)"]


def test_untied_module_requires_lm_head(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=26, tied=True)
    with pytest.raises(WeightsMismatch) as info:
        load_weights(TinyLlama(tied=False), write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)
    assert info.value.missing == ["lm_head.weight"]


# -- one error listing every problem ------------------------------------------------------------


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_one_error_names_every_problem(tmp_path: Path, layout: str) -> None:
    tensors = hf_tensors(seed=31)
    del tensors["model.layers.0.self_attn.k_proj.weight"]  # missing shard of a fused parameter
    del tensors["model.norm.weight"]  # missing plain parameter
    tensors["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)  # unexpected
    tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(H, FF + 1)  # mis-shaped
    d = (write_single if layout == "single" else write_sharded)(tensors, tmp_path / "m")
    module = TinyLlama()
    before = {n: p.clone() for n, p in module.named_parameters()}
    with pytest.raises(WeightsMismatch) as info:
        load_weights(module, d, LLAMA_STYLE_MAPPING)
    message = str(info.value)
    for name in (
        "model.layers.0.self_attn.k_proj.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.extra_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ):
        assert name in message
    assert str(d) in message
    assert sorted(info.value.missing) == ["model.layers.0.self_attn.k_proj.weight", "model.norm.weight"]
    assert info.value.unexpected == ["model.layers.0.self_attn.extra_proj.weight"]
    assert info.value.mismatched == ["model.layers.1.mlp.down_proj.weight is [8, 13], expected [8, 12]"]
    # Nothing was copied: the plan is checked in full before the first byte is read.
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters())


def test_mis_shaped_fused_part_names_its_shard_size(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=32)
    tensors["model.layers.0.self_attn.v_proj.weight"] = torch.zeros(KV + 1, H)
    with pytest.raises(WeightsMismatch, match=r"v_proj\.weight is \[5, 8\], expected \[4, 8\]"):
        load_weights(TinyLlama(), write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)


def test_integer_tensor_for_a_float_parameter(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=33)
    tensors["model.norm.weight"] = torch.arange(H, dtype=torch.int64)
    with pytest.raises(WeightsMismatch, match=r"model\.norm\.weight has dtype torch\.int64"):
        load_weights(TinyLlama(), write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)


def test_checkpoint_with_fused_projections_fills_every_shard(tmp_path: Path) -> None:
    # Phi-3 stores qkv_proj and gate_up_proj already fused: one tensor fills all shards at once.
    tensors = hf_tensors(seed=36)
    fused = dict(tensors)
    for i in range(L):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        fused[f"{a}.qkv_proj.weight"] = torch.cat([fused.pop(f"{a}.{n}_proj.weight") for n in "qkv"])
        fused[f"{m}.gate_up_proj.weight"] = torch.cat(
            [fused.pop(f"{m}.{n}_proj.weight") for n in ("gate", "up")]
        )
    split, joined = TinyLlama(), TinyLlama()
    load_weights(split, write_single(tensors, tmp_path / "split"), LLAMA_STYLE_MAPPING)
    load_weights(joined, write_single(fused, tmp_path / "fused"), LLAMA_STYLE_MAPPING)
    for (name, a), (_, b) in zip(split.state_dict().items(), joined.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    half = dict(fused)
    half["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(Q + KV, H)
    with pytest.raises(
        WeightsMismatch, match=rf"qkv_proj\.weight is \[{Q + KV}, {H}\], expected \[{Q + 2 * KV}, {H}\]"
    ):
        load_weights(TinyLlama(), write_single(half, tmp_path / "half"), LLAMA_STYLE_MAPPING)


def test_two_tensors_filling_one_parameter(tmp_path: Path) -> None:
    # A checkpoint that carries the fused tensor and its parts fills shard 0 twice: refused.
    tensors = hf_tensors(seed=34)
    tensors["model.layers.0.self_attn.qkv_proj.weight"] = torch.zeros(Q + 2 * KV, H)
    with pytest.raises(WeightsMismatch) as info:
        load_weights(TinyLlama(), write_single(tensors, tmp_path / "m"), LLAMA_STYLE_MAPPING)
    a = "model.layers.0.self_attn"
    assert (
        f"{a}.q_proj.weight and {a}.qkv_proj.weight all fill {a}.qkv_proj.weight[shard 0]"
        in info.value.mismatched
    )
    # A mapping that sends two names to one slot is reported rather than letting the last one win.
    clash = WeightMapping(fused=LLAMA_STYLE_MAPPING.fused + (FusedPart("q_alt", "qkv_proj", 0),))
    tensors = hf_tensors(seed=34)
    del (
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"],
        tensors["model.layers.1.self_attn.rotary_emb.inv_freq"],
    )
    tensors["model.layers.0.self_attn.q_alt.weight"] = torch.zeros(Q, H)
    with pytest.raises(WeightsMismatch, match=r"q_alt\.weight and .*q_proj\.weight all fill"):
        load_weights(TinyLlama(), write_single(tensors, tmp_path / "m2"), clash)


def test_wrong_shard_sizes_are_a_programming_error(tmp_path: Path) -> None:
    module = TinyLlama()
    module.model.layers[0].self_attn.qkv_proj.shard_sizes = (Q, KV, KV + 1)  # type: ignore[assignment]
    with pytest.raises(InvalidArgument, match="shard_sizes"):
        load_weights(module, write_single(hf_tensors(seed=35), tmp_path / "m"), LLAMA_STYLE_MAPPING)


# -- the mapping itself ------------------------------------------------------------------------


def test_llama_mapping_table() -> None:
    m = LLAMA_STYLE_MAPPING
    assert m.map("model.layers.3.self_attn.q_proj.weight") == WeightTarget(
        "model.layers.3.self_attn.qkv_proj.weight", 0
    )
    assert m.map("model.layers.3.self_attn.k_proj.bias") == WeightTarget(
        "model.layers.3.self_attn.qkv_proj.bias", 1
    )
    assert m.map("model.layers.3.self_attn.v_proj.weight") == WeightTarget(
        "model.layers.3.self_attn.qkv_proj.weight", 2
    )
    assert m.map("model.layers.0.mlp.gate_proj.weight") == WeightTarget(
        "model.layers.0.mlp.gate_up_proj.weight", 0
    )
    assert m.map("model.layers.0.mlp.up_proj.weight") == WeightTarget(
        "model.layers.0.mlp.gate_up_proj.weight", 1
    )
    assert m.map("model.layers.0.mlp.down_proj.weight") == WeightTarget(
        "model.layers.0.mlp.down_proj.weight", None
    )
    assert m.map("model.layers.0.self_attn.o_proj.weight") == WeightTarget(
        "model.layers.0.self_attn.o_proj.weight", None
    )
    assert m.map("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert m.map("lm_head.weight") == WeightTarget("lm_head.weight", None)
    # Whole components only: a module merely containing "up_proj" in its name is not fused.
    assert m.map("model.layers.0.mlp.setup_proj.weight") == WeightTarget(
        "model.layers.0.mlp.setup_proj.weight", None
    )
    assert m.map("q_proj.weight") == WeightTarget("qkv_proj.weight", 0)  # a top-level module matches too
    for name in (
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "x.q_proj.bias",
    ):
        target = m.map(name)
        assert target is not None and m.checkpoint_name(target) == name


# -- refused and corrupt checkpoints -----------------------------------------------------------


class _Boobytrap:
    """Unpickling this creates a marker file: proof that a pickle was (not) executed."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "model.pt", "weights.pth", "pytorch_model-00001-of-00002.bin"]
)
def test_pickle_checkpoints_are_refused_unread(tmp_path: Path, name: str) -> None:
    d = tmp_path / "m"
    d.mkdir()
    marker = tmp_path / "pwned"
    (d / name).write_bytes(pickle.dumps(_Boobytrap(str(marker))))
    (d / "config.json").write_text("{}")
    with pytest.raises(UnsafeCheckpoint, match=name.replace(".", r"\.")):
        load_weights(TinyLlama(), d, LLAMA_STYLE_MAPPING)
    assert not marker.exists()
    # The trap works when unpickled, so the assertion above can fail.
    pickle.loads((d / name).read_bytes())
    assert marker.exists()


def test_pickle_next_to_safetensors_is_ignored(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=41)
    d = write_single(tensors, tmp_path / "m")
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Boobytrap(str(marker))))
    module = TinyLlama()
    load_weights(module, d, LLAMA_STYLE_MAPPING)
    assert_loaded(module, expected_parameters(tensors))
    assert not marker.exists()


def test_no_weights_at_all(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="no safetensors weights"):
        load_weights(TinyLlama(), tmp_path, LLAMA_STYLE_MAPPING)


def _small_file(tmp_path: Path) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    save_file(
        {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)},
        str(d / "model.safetensors"),
    )
    return d


def _rewrite(path: Path, header: object, data: bytes, header_len: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


GOOD_HEADER = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
}


@pytest.mark.parametrize(
    ("header", "data", "header_len", "match"),
    [
        (GOOD_HEADER, bytes(39), None, "truncated"),
        (GOOD_HEADER, bytes(40), 1 << 62, "header length"),
        (GOOD_HEADER, bytes(40), 10_000, "header length"),
        ({"a": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 24]}}, bytes(24), None, "needs"),
        ({"a": {"dtype": "F32", "shape": [1 << 40], "data_offsets": [0, 1 << 42]}}, bytes(24), None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [1000, 1024]}}, bytes(40), None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 0]}}, bytes(40), None, "claims"),
        ({"a": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}, bytes(40), None, "negative"),
        ({"a": {"dtype": "F32", "shape": [2.0, 3], "data_offsets": [0, 24]}}, bytes(40), None, "malformed"),
        ({"a": {"dtype": "F32", "shape": "23", "data_offsets": [0, 24]}}, bytes(40), None, "malformed"),
        ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 12, 24]}}, bytes(40), None, "malformed"),
        ({"a": {"dtype": "F32", "shape": [2, 3]}}, bytes(40), None, "malformed"),
        ({"a": {"dtype": "Q4_K", "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(40), None, "dtype"),
        ({"a": {"dtype": ["F32"], "shape": [2, 3], "data_offsets": [0, 24]}}, bytes(40), None, "dtype"),
        ({"a": [1, 2, 3]}, bytes(40), None, "malformed"),
        ([1, 2, 3], bytes(40), None, "JSON object"),
        (b"{not json", bytes(40), None, "not valid JSON"),
        (b"\xff\xfe\x00garbage", bytes(40), None, "not valid JSON"),
        (b"[" * 200_000, b"", None, "not valid JSON"),
        (b"", bytes(40), None, "not valid JSON"),
    ],
    ids=[
        "cut-data", "huge-header-len", "header-len-past-end", "huge-shape", "offsets-past-end",
        "data-offset-past-end", "reversed-offsets", "negative-dims", "float-dim", "string-shape",
        "three-offsets", "no-offsets", "unknown-dtype", "list-dtype", "entry-not-object",
        "header-not-object", "not-json", "not-utf8", "deep-nesting", "empty-header",
    ],
)  # fmt: skip
def test_corrupt_headers(
    tmp_path: Path, header: object, data: bytes, header_len: int | None, match: str
) -> None:
    d = _small_file(tmp_path)
    _rewrite(d / "model.safetensors", header, data, header_len)
    with pytest.raises(CorruptCheckpoint, match=match) as info:
        index_checkpoint(d)
    assert "model.safetensors" in str(info.value)


@pytest.mark.parametrize("size", [0, 3, 7])
def test_file_shorter_than_the_header_length_field(tmp_path: Path, size: int) -> None:
    d = _small_file(tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:size])
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        index_checkpoint(d)


def test_every_cut_of_a_real_file_is_refused(tmp_path: Path) -> None:
    d = write_single(hf_tensors(seed=42), tmp_path / "m")
    path = d / "model.safetensors"
    whole = path.read_bytes()
    rng = random.Random(42)
    for cut in sorted({8, len(whole) - 1, *(rng.randrange(len(whole)) for _ in range(40))}):
        path.write_bytes(whole[:cut])
        with pytest.raises(CorruptCheckpoint):
            load_weights(TinyLlama(), d, LLAMA_STYLE_MAPPING)


def test_random_header_corruption_never_crashes(tmp_path: Path) -> None:
    """Flip bytes of a real header: the loader either loads or raises one of our errors."""
    tensors = hf_tensors(seed=43)
    d = write_single(tensors, tmp_path / "m")
    path = d / "model.safetensors"
    whole = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", bytes(whole[:8]))[0]
    rng = random.Random(43)
    outcomes = set()
    for _ in range(150):
        broken = bytearray(whole)
        for _ in range(rng.randint(1, 4)):
            broken[rng.randrange(header_end)] = rng.randrange(256)
        path.write_bytes(bytes(broken))
        try:
            load_weights(TinyLlama(), d, LLAMA_STYLE_MAPPING)
            outcomes.add("loaded")
        except ModelWorkerError as exc:
            assert isinstance(exc, InvalidArgument), exc
            outcomes.add(type(exc).__name__)
    assert "CorruptCheckpoint" in outcomes  # the fuzzing did reach the checks


# -- broken indexes ----------------------------------------------------------------------------


def _sharded(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    d = write_sharded(hf_tensors(seed=51), tmp_path / "m", shards=3, seed=51)
    return d, json.loads((d / INDEX_FILE).read_text())


def test_index_names_a_missing_shard(tmp_path: Path) -> None:
    d, _ = _sharded(tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint, match="model-00002-of-00003.safetensors"):
        load_weights(TinyLlama(), d, LLAMA_STYLE_MAPPING)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda idx: "{oops", "not a valid safetensors index"),
        (lambda idx: {"metadata": {}}, "not a valid safetensors index"),
        (lambda idx: {"weight_map": ["a"]}, "not a valid safetensors index"),
        (lambda idx: [], "not a valid safetensors index"),
        (lambda idx: {"weight_map": {"a": 3}}, "must be a file name"),
        (lambda idx: {"weight_map": {"a": None}}, "must be a file name"),
        (lambda idx: {"weight_map": {"a": "/etc/passwd"}}, "must be a file in the model directory"),
        (
            lambda idx: {"weight_map": {"a": "../m2/model.safetensors"}},
            "must be a file in the model directory",
        ),
        (lambda idx: {"weight_map": {"a": "sub/model.safetensors"}}, "must be a file in the model directory"),
        (lambda idx: {"weight_map": {"a": ".."}}, "must be a file in the model directory"),
    ],
)
def test_broken_index(tmp_path: Path, mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    d, index = _sharded(tmp_path)
    new = mutate(index)
    (d / INDEX_FILE).write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(CorruptCheckpoint, match=match):
        load_weights(TinyLlama(), d, LLAMA_STYLE_MAPPING)


def test_index_that_points_at_the_wrong_shard(tmp_path: Path) -> None:
    d, index = _sharded(tmp_path)
    weight_map = index["weight_map"]
    assert isinstance(weight_map, dict)
    name = "model.norm.weight"
    weight_map[name] = next(s for s in sorted(set(weight_map.values())) if s != weight_map[name])
    weight_map["model.ghost.weight"] = weight_map[name]
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpoint) as info:
        load_weights(TinyLlama(), d, LLAMA_STYLE_MAPPING)
    assert name in str(info.value) and "model.ghost.weight" in str(info.value)


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    d, index = _sharded(tmp_path)
    save_file({"model.norm.weight": torch.zeros(H)}, str(d / "extra.safetensors"))
    index["weight_map"]["model.extra_dup"] = "extra.safetensors"  # type: ignore[index]
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpoint, match="appears in both"):
        load_weights(TinyLlama(), d, LLAMA_STYLE_MAPPING)


def test_estimate_weight_bytes(tmp_path: Path) -> None:
    tensors = hf_tensors(seed=61, dtype=torch.bfloat16)
    tensors["step"] = torch.tensor([3], dtype=torch.int64)  # non-float tensors keep their size
    d = write_sharded(tensors, tmp_path / "m", shards=2)
    floats = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    assert estimate_weight_bytes(d, torch.float32) == floats * 4 + 8
    assert estimate_weight_bytes(d, None) == floats * 2 + 8
