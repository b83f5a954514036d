"""Every unsupported quantization variant is refused before any tensor is read, as
INVALID_ARGUMENT naming the field; the supported ones parse to the right scheme and label."""

from __future__ import annotations

import pytest
import torch

from registry import InvalidArgument
from registry.quantization.formats import (
    AWQ_ORDER,
    AWQ_REVERSE_ORDER,
    pack_cols,
    pack_rows,
    unpack_cols,
    unpack_rows,
)
from registry.quantization.scheme import parse_quantization_config, scheme_for_load

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}
CT_W4A16 = {
    "quant_method": "compressed-tensors",
    "format": "pack-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 128,
            },
        }
    },
    "ignore": ["lm_head"],
}


def _with(base: dict, **changes) -> dict:
    out = {**base, **changes}
    return {k: v for k, v in out.items() if v is not ...}


def _ct_weights(**changes) -> dict:
    weights = {**CT_W4A16["config_groups"]["group_0"]["weights"], **changes}
    return {**CT_W4A16, "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"quant_method": "bitsandbytes"}, "quantization_config.quant_method 'bitsandbytes'"),
        ({"bits": 4}, "quantization_config.quant_method None"),
        (_with(GPTQ, bits=3), "quantization_config.bits 3"),
        (_with(GPTQ, bits=2), "quantization_config.bits 2"),
        (_with(GPTQ, group_size=100), "quantization_config.group_size"),
        (_with(GPTQ, checkpoint_format="marlin"), "quantization_config.checkpoint_format 'marlin'"),
        (_with(GPTQ, dynamic={"-:.*down": {}}), "quantization_config.dynamic"),
        (_with(GPTQ, desc_act="yes"), "quantization_config.desc_act 'yes'"),
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
            "quantization_config.version 'gemv'",
        ),
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "quantization_config.bits 8"),
        ({"quant_method": "awq", "bits": 4, "zero_point": False}, "quantization_config.zero_point False"),
        ({"quant_method": "fp8", "fmt": "e5m2"}, "quantization_config.fmt 'e5m2'"),
        ({"quant_method": "fp8", "weight_block_size": [128]}, "quantization_config.weight_block_size"),
        ({"quant_method": "fp8", "activation_scheme": "weird"}, "quantization_config.activation_scheme"),
        (_with(CT_W4A16, format="int-quantized"), "quantization_config.format 'int-quantized'"),
        (_with(CT_W4A16, format="naive-quantized"), "quantization_config.format 'naive-quantized'"),
        (_ct_weights(num_bits=3), "config_groups.group_0.weights.num_bits 3"),
        (_ct_weights(strategy="token"), "config_groups.group_0.weights.strategy 'token'"),
        (_ct_weights(actorder="dynamic"), "config_groups.group_0.weights.actorder 'dynamic'"),
        (_ct_weights(dynamic=True), "config_groups.group_0.weights.dynamic"),
        (_with(CT_W4A16, sparsity_config={"format": "sparse-24"}), "quantization_config.sparsity_config"),
        (_with(CT_W4A16, kv_cache_scheme={"num_bits": 8}), "quantization_config.kv_cache_scheme"),
        (
            {
                **CT_W4A16,
                "format": "int-quantized",
                "config_groups": {
                    "g": {
                        "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "int", "dynamic": True},
                    }
                },
            },
            "quantization_config.format 'int-quantized'",
        ),
        (
            {
                **CT_W4A16,
                "config_groups": {
                    "a": CT_W4A16["config_groups"]["group_0"],
                    "b": _ct_weights(num_bits=8, strategy="channel")["config_groups"]["group_0"],
                },
            },
            "config_groups use different weight schemes",
        ),
        ([], "quantization_config must be an object"),
    ],
)
def test_unsupported_variants_name_the_field(config, field: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_quantization_config(config)
    assert field in str(exc.value)


@pytest.mark.parametrize(
    ("config", "label"),
    [
        (GPTQ, "gptq-int4-g128"),
        (_with(GPTQ, bits=8, group_size=-1, sym=False, desc_act=True), "gptq-int8-channel-act-asym"),
        (
            {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM", "zero_point": True},
            "awq-int4-g64-asym",
        ),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "fp8-block128x128"),
        ({"quant_method": "fp8", "activation_scheme": "static"}, "fp8-tensor"),
        (CT_W4A16, "compressed-tensors-int4-g128"),
    ],
)
def test_supported_configs_and_their_labels(config, label: str) -> None:
    assert parse_quantization_config(config).label == label


def test_load_request_rules() -> None:
    assert scheme_for_load(None, "", False, "cpu") is None
    assert scheme_for_load(None, "INT8", False, "cpu").label == "int8"
    assert scheme_for_load(None, "int4", False, "cpu").label == "int4"
    with pytest.raises(InvalidArgument, match="quantization 'int3' is not supported"):
        scheme_for_load(None, "int3", False, "cpu")
    with pytest.raises(
        InvalidArgument, match="is_quant_model is true but config.json has no quantization_config"
    ):
        scheme_for_load(None, "", True, "cpu")
    with pytest.raises(
        InvalidArgument, match="quantization 'fp8' needs a CUDA device of compute capability 8.9"
    ):
        scheme_for_load(None, "fp8", False, "cpu")
    with pytest.raises(InvalidArgument, match="quantization 'fp8' needs a CUDA device"):
        scheme_for_load(None, "fp8", False, "cuda", (8, 0))
    assert scheme_for_load(None, "fp8", False, "cuda", (9, 0)).label == "fp8"
    with pytest.raises(InvalidArgument, match="already quantized \\(gptq-int4-g128\\)"):
        scheme_for_load(GPTQ, "int8", True, "cpu")
    # A quantized checkpoint loads with or without is_quant_model.
    assert scheme_for_load(GPTQ, "", False, "cpu").label == scheme_for_load(GPTQ, "", True, "cpu").label


@pytest.mark.parametrize("bits", [4, 8])
def test_bit_packing_round_trips_and_matches_compressed_tensors(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (16, 64), generator=gen, dtype=torch.uint8)
    assert torch.equal(unpack_cols(pack_cols(codes, bits), bits), codes)
    assert torch.equal(unpack_rows(pack_rows(codes, bits), bits), codes)
    # The library packs signed codes offset by 2^(bits-1), LSB first: the same words as ours.
    signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    assert torch.equal(pack_to_int32(signed, bits), pack_cols(codes, bits))
    assert torch.equal(pack_to_int32(signed, bits, packed_dim=0), pack_rows(codes, bits))
    back = unpack_from_int32(pack_cols(codes, bits), bits, codes.shape)
    assert torch.equal(back, signed)


def test_awq_order_is_the_inverse_permutation() -> None:
    codes = torch.arange(16, dtype=torch.uint8).remainder(16).reshape(2, 8)
    words = pack_cols(codes, 4, AWQ_ORDER)
    nibbles = unpack_cols(words, 4)  # slot order
    assert torch.equal(nibbles[:, list(AWQ_REVERSE_ORDER)], codes)
