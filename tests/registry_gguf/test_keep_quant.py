"""`import-gguf --keep-quant`: llama.cpp's Q4_0 / Q4_1 / Q8_0 blocks split into our codes and scales
and read back bit-exactly (against the gguf package's own dequantization), tiny Llamas whose kept
projections compute exactly what the plain import computes, and every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from architectures import llama
from architectures.quantized_linear import GroupedIntLinear, Int4PackedLinear, make_quantized_linear
from registry import InvalidConfig, KvCacheOptions, LoadOptions
from registry.gguf_import import GgufImportError, import_gguf, main_import
from registry.quantization import parse_quantization_config
from registry.quantization.gguf_blocks import gguf_weight, split_blocks
from tests.registry_gguf.gguf_files import gguf_tensors_of, random_blocks, write_gguf
from tests.tiny_models import make_hf_model

Q = gguf.GGMLQuantizationType
OPTIONS = LoadOptions(dtype=torch.float32, kv_cache=KvCacheOptions(max_seq_len=32))


@pytest.fixture(scope="module")
def tiny_llama():
    return make_hf_model("llama", seed=5)


def _weight(block_type: str, raw: np.ndarray, n: int, k: int):
    parts = {s: torch.from_numpy(a) for s, a in split_blocks(block_type, raw, n, k).items()}
    return gguf_weight(block_type, parts["gguf_codes"], parts["gguf_scales"], parts.get("gguf_mins"))


@pytest.mark.parametrize("block_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_read_back_bit_exactly(block_type):
    n, k = 48, 96
    raw = random_blocks(np.random.default_rng(1), block_type, (n, k))
    expected = torch.from_numpy(gguf.quants.dequantize(raw, Q[block_type]).reshape(n, k).astype(np.float32))
    w = _weight(block_type, raw, n, k)
    assert w.bits == (8 if block_type == "Q8_0" else 4) and w.group_size == 32
    assert torch.equal(w.dequantize(), expected)  # the same float32 operations, bit for bit
    layer = make_quantized_linear(w, torch.device("cpu"), torch.float32, bias=False)
    assert isinstance(layer, GroupedIntLinear)  # packed codes, dequantized per call in float32
    assert torch.equal(layer.dequantize(torch.float32), expected)
    codes = split_blocks(block_type, raw, n, k)["gguf_codes"]
    assert codes.dtype == np.uint8 and codes.shape == (n, k // 2 if w.bits == 4 else k)


def test_q4_1_offset_folds_into_the_int4_kernel_zero():
    """The CPU int4 kernel computes (q - 8) * s + z: Q4_1's d * q + m is z = 8d + m (in bfloat16)."""
    n, k = 32, 64
    raw = random_blocks(np.random.default_rng(2), "Q4_1", (n, k))
    w = _weight("Q4_1", raw, n, k)
    layer = make_quantized_linear(w, torch.device("cpu"), torch.bfloat16, bias=False)
    if not isinstance(layer, Int4PackedLinear):
        pytest.skip(f"no CPU int4 kernel here ({layer.kernel})")
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))
    expected = x @ w.dequantize().t()
    got = layer(x.bfloat16()).float()
    # bfloat16 activations, scales and zeros: ~3 significant digits
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


def _mixed_gguf(path: Path, model, types: dict[str, str]) -> Path:
    """The tiny Llama with each 2-D tensor in the block type its llama.cpp name part maps to."""
    payload = {}
    for name, data in gguf_tensors_of(model, "llama").items():
        kind = next((t for part, t in types.items() if part in name), "F32") if data.ndim == 2 else "F32"
        payload[name] = (gguf.quants.quantize(data, Q[kind]), Q[kind]) if kind != "F32" else data
    return write_gguf(path, model.config, "llama", payload)


MIXED = {
    "attn_q": "Q4_0",
    "attn_k": "Q4_0",
    "attn_v": "Q4_0",
    "attn_output": "Q4_1",
    "ffn_": "Q4_1",
    "output.weight": "Q8_0",
    "token_embd": "Q8_0",
}


def _logits(model_dir: Path) -> tuple[torch.Tensor, str]:
    model = llama.build(model_dir, torch.device("cpu"), OPTIONS)
    ids = torch.arange(20).reshape(1, 20) * 5 % 128
    return model.forward(ids), model.quantization


@pytest.mark.parametrize(
    ("mode", "types", "label", "kept"),
    [
        ("int4", MIXED, "gguf-q4_0+q4_1+q8_0", 2 * 7 + 1),
        ("int8", MIXED, "gguf-q8_0", 1),  # only lm_head is Q8_0: the Q4 projections are dequantized
        # q in Q8_0 but k/v in Q4_0: the fused qkv cannot hold one code width and is dequantized
        ("int4", {**MIXED, "attn_q": "Q8_0"}, "gguf-q4_1+q8_0", 2 * 4 + 1),
    ],
)
def test_kept_projections_compute_what_the_plain_import_computes(
    tmp_path, tiny_llama, mode, types, label, kept
):
    src = _mixed_gguf(tmp_path / "mixed.gguf", tiny_llama, types)
    plain = import_gguf(src, tmp_path / "plain", tokenizer=False, progress=False)
    out = import_gguf(src, tmp_path / mode, tokenizer=False, progress=False, keep_quant=mode)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "gguf" and len(config["tensor_types"]) == kept
    expected, _ = _logits(plain)
    got, quantization = _logits(out)
    assert quantization == label
    assert torch.equal(got, expected)


def test_kept_tensors_shard_like_dense_ones(tmp_path, tiny_llama):
    src = _mixed_gguf(tmp_path / "mixed.gguf", tiny_llama, MIXED)
    whole = import_gguf(src, tmp_path / "whole", tokenizer=False, progress=False, keep_quant="int4")
    sharded = import_gguf(
        src, tmp_path / "sharded", tokenizer=False, progress=False, keep_quant="int4", max_shard_bytes=20_000
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "model.layers.0.mlp.down_proj.gguf_mins" in index["weight_map"]
    assert torch.equal(_logits(sharded)[0], _logits(whole)[0])


def _cli_error(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main_import([*map(str, args), "--no-tokenizer", "--no-progress"])
    return code, capsys.readouterr().err


def test_projections_in_other_block_types_are_refused(tmp_path, tiny_llama, capsys):
    src = _mixed_gguf(tmp_path / "q5.gguf", tiny_llama, {"ffn_down": "Q5_0", **MIXED})
    code, err = _cli_error(capsys, src, tmp_path / "out", "--keep-quant", "int4")
    assert code == 1 and err.count("\n") == 1
    assert str(src) in err and "blk.0.ffn_down.weight (Q5_0)" in err and "keeps only Q4_0, Q4_1, Q8_0" in err
    assert not (tmp_path / "out").exists()


def test_nothing_to_keep_is_refused(tmp_path, tiny_llama, capsys):
    q4 = _mixed_gguf(
        tmp_path / "q4.gguf", tiny_llama, {"attn": "Q4_0", "ffn": "Q4_0", "output.weight": "Q4_1"}
    )
    code, err = _cli_error(capsys, q4, tmp_path / "a", "--keep-quant", "int8")
    assert code == 1 and "no projection is stored in Q8_0" in err and "use --keep-quant int4" in err
    dense = _mixed_gguf(tmp_path / "f32.gguf", tiny_llama, {})
    code, err = _cli_error(capsys, dense, tmp_path / "b", "--keep-quant", "int4")
    assert code == 1 and "no projection is stored in Q4_0 or Q4_1 or Q8_0 (the projections are F32)" in err
    code, err = _cli_error(capsys, dense, tmp_path / "c", "--keep-quant", "int2")
    assert code == 2 and "invalid choice: 'int2'" in err
    with pytest.raises(GgufImportError, match="--keep-quant 'fp8' is not supported"):
        import_gguf(dense, tmp_path / "d", keep_quant="fp8")
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_config_with_other_block_types_is_refused():
    with pytest.raises(
        InvalidConfig, match=r"tensor_types\.model\.layers\.0\.mlp\.up_proj 'Q5_0' is not supported"
    ):
        parse_quantization_config(
            {"quant_method": "gguf", "tensor_types": {"model.layers.0.mlp.up_proj": "Q5_0"}}
        )
    with pytest.raises(InvalidConfig, match="tensor_types must be a non-empty object"):
        parse_quantization_config({"quant_method": "gguf"})


@pytest.fixture(scope="module")
def server_root(tmp_path_factory, tiny_llama) -> Path:
    root = tmp_path_factory.mktemp("kept")
    src = _mixed_gguf(root / "mixed.gguf", tiny_llama, MIXED)
    import_gguf(src, root / "plain", tokenizer=False, progress=False)
    out = import_gguf(src, root / "kept", tokenizer=False, progress=False, keep_quant="int4")
    bad = root / "kept-q5"  # a config naming a block type no layer can keep
    bad.mkdir()
    (bad / "model.safetensors").symlink_to(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["tensor_types"]["model.layers.1.mlp.up_proj"] = "Q5_0"
    (bad / "config.json").write_text(json.dumps(config))
    return root


def test_kept_model_through_a_real_server(aio_loop, server_root):
    from tests.worker.harness import load_request, make_settings, rpc_error, start_server
    from worker.pb.modelworker.v1 import worker_pb2 as pb

    server = start_server(aio_loop, make_settings(server_root))
    try:
        stub = server.stub()
        plain = stub.Load(load_request("plain", "plain", dtype="float32")).model
        info = stub.Load(load_request("kept", "kept", dtype="float32")).model
        assert info.quantization == "gguf-q4_0+q4_1+q8_0" and info.dtype == "float32"
        assert plain.quantization == "" and info.weight_bytes < plain.weight_bytes // 2
        tokens = torch.arange(14).reshape(2, 7) * 9 % 128
        with torch.inference_mode():
            logits = {}
            for name in ("plain", "kept"):
                with server.registry.get_model_mut(name) as model:
                    logits[name] = model.forward(tokens, None, all_logits=True)
        assert torch.equal(logits["kept"], logits["plain"])
        err = rpc_error(lambda: stub.Load(load_request("bad", "kept-q5")))
        assert err.code().name == "INVALID_ARGUMENT"
        assert "tensor_types.model.layers.1.mlp.up_proj 'Q5_0' is not supported" in err.details()
        assert "bad" not in {m.id for m in stub.ListModels(pb.ListModelsRequest()).models}
    finally:
        server.stop(grace=0.5)
