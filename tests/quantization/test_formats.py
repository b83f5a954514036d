"""Every supported quantized format, loaded through the builder: logits equal a float32 model built
from the dequantized weights (float32 activations: the exact path), and the CPU kernel path
(bfloat16 activations, weights repacked for torch's int8/int4 kernels) stays within bfloat16 error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from architectures.llama import build
from architectures.quantized_linear import Fp8Linear, GroupedIntLinear, Int4PackedLinear, Int8Linear
from registry import LoadOptions

from . import checkpoints as ck

# name → (quantization_config, layer writer, ModelInfo.quantization)
FORMATS = {
    "gptq-4-g32-asym": (
        ck.gptq_config(4, 32, False, False),
        ck.gptq_layer(4, 32, False, False),
        "gptq-int4-g32-asym",
    ),
    "gptq-4-g32-sym-act": (
        ck.gptq_config(4, 32, True, True),
        ck.gptq_layer(4, 32, True, True),
        "gptq-int4-g32-act",
    ),
    "gptq-4-channel": (
        ck.gptq_config(4, -1, True, False),
        ck.gptq_layer(4, -1, True, False),
        "gptq-int4-channel",
    ),
    "gptq-8-g32-v2": (
        ck.gptq_config(8, 32, False, False, v2=True),
        ck.gptq_layer(8, 32, False, False, v2=True),
        "gptq-int8-g32-asym",
    ),
    "gptq-8-channel-sym": (
        ck.gptq_config(8, -1, True, False),
        ck.gptq_layer(8, -1, True, False),
        "gptq-int8-channel",
    ),
    "awq-4-g32": (ck.awq_config(32), ck.awq_layer(32), "awq-int4-g32-asym"),
    "fp8-block-32x48": (ck.fp8_block_config((32, 48)), ck.fp8_block_layer((32, 48)), "fp8-block32x48"),
}


def _ct_formats() -> dict:
    int4_asym = ck.ct_scheme("int", num_bits=4, symmetric=False, strategy="group", group_size=32)
    int4_sym = ck.ct_scheme("int", num_bits=4, symmetric=True, strategy="group", group_size=32)
    int8_chan = ck.ct_scheme("int", num_bits=8, symmetric=True, strategy="channel")
    fp8_chan = ck.ct_scheme("float", num_bits=8, symmetric=True, strategy="channel")
    fp8_tensor = ck.ct_scheme("float", num_bits=8, symmetric=True, strategy="tensor")
    return {
        "ct-int4-g32-asym": (
            ck.ct_config(int4_asym, "pack-quantized"),
            ck.ct_layer(int4_asym),
            "compressed-tensors-int4-g32-asym",
        ),
        "ct-int4-g32-sym": (
            ck.ct_config(int4_sym, "pack-quantized"),
            ck.ct_layer(int4_sym),
            "compressed-tensors-int4-g32",
        ),
        "ct-int8-channel": (
            ck.ct_config(int8_chan, "pack-quantized"),
            ck.ct_layer(int8_chan),
            "compressed-tensors-int8-channel",
        ),
        "ct-fp8-channel": (
            ck.ct_config(fp8_chan, "float-quantized"),
            ck.ct_layer(fp8_chan),
            "compressed-tensors-fp8-channel",
        ),
        "ct-fp8-tensor": (
            ck.ct_config(fp8_tensor, "float-quantized"),
            ck.ct_layer(fp8_tensor),
            "compressed-tensors-fp8-tensor",
        ),
    }


FORMATS.update(_ct_formats())
# The layer class each format gets on the CPU kernel path (bfloat16 activations).
KERNEL_LAYER = {
    "gptq-4-g32-asym": Int4PackedLinear,
    "gptq-4-g32-sym-act": Int4PackedLinear,
    "gptq-4-channel": Int4PackedLinear,
    "gptq-8-g32-v2": GroupedIntLinear,
    "gptq-8-channel-sym": Int8Linear,
    "awq-4-g32": Int4PackedLinear,
    "fp8-block-32x48": Fp8Linear,
    "ct-int4-g32-asym": Int4PackedLinear,
    "ct-int4-g32-sym": Int4PackedLinear,
    "ct-int8-channel": Int8Linear,
    "ct-fp8-channel": Fp8Linear,
    "ct-fp8-tensor": Fp8Linear,
}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("quantized")
    return {
        name: ck.write_checkpoint(root / name, cfg, layer, seed=i)
        for i, (name, (cfg, layer, _)) in enumerate(FORMATS.items())
    }


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("name", list(FORMATS))
def test_logits_equal_the_dequantized_float32_model(name: str, written) -> None:
    model_dir, reference = written[name]
    model = build(model_dir, torch.device("cpu"), LoadOptions(dtype=torch.float32))
    with torch.no_grad():
        expected = reference(_ids()).logits
    got = model.forward(_ids())
    assert model.quantization == FORMATS[name][2]
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
    # Weights stay quantized: no dense float copy of any projection is resident.
    layers = [
        m
        for m in model.network.modules()
        if type(m).__name__.endswith("Linear") and m is not model.network.lm_head
    ]
    assert layers and not any(isinstance(m, torch.nn.Linear) for m in layers)


@pytest.mark.parametrize("name", list(FORMATS))
def test_cpu_kernel_path_stays_within_bfloat16_error(name: str, written) -> None:
    model_dir, reference = written[name]
    model = build(model_dir, torch.device("cpu"), LoadOptions(dtype=torch.bfloat16))
    kinds = {
        type(m)
        for m in model.network.modules()
        if isinstance(m, (Int8Linear, Int4PackedLinear, GroupedIntLinear, Fp8Linear))
    }
    assert kinds == {KERNEL_LAYER[name]}
    with torch.no_grad():
        expected = reference(_ids()).logits
    got = model.forward(_ids())
    assert float((got - expected).abs().max()) <= 3e-2 * float(expected.abs().max())


def test_weight_bytes_count_the_packed_tensors(written) -> None:
    dense = build(
        written["gptq-4-g32-asym"][0].parent / "gptq-4-g32-asym",
        torch.device("cpu"),
        LoadOptions(dtype=torch.bfloat16),
    )
    fp32 = build(written["gptq-4-g32-asym"][0], torch.device("cpu"), LoadOptions(dtype=torch.float32))
    for model in (dense, fp32):
        total = sum(
            t.numel() * t.element_size()
            for t in {
                id(t): t for t in list(model.network.parameters()) + list(model.network.buffers())
            }.values()
        )
        assert model.weight_bytes == total
    # Logical parameter count does not change with packing.
    assert (
        dense.num_parameters
        == fp32.num_parameters
        == sum(p.numel() for p in written["gptq-4-g32-asym"][1].parameters())
    )


@pytest.mark.parametrize("name", ["gptq-4-g32-asym", "awq-4-g32", "ct-int8-channel", "fp8-block-32x48"])
def test_admission_estimate_is_close_to_the_resident_bytes(name: str, written) -> None:
    from registry.quantization.estimate import estimate_quantized_bytes

    model = build(written[name][0], torch.device("cpu"), LoadOptions(dtype=torch.bfloat16))
    estimate = estimate_quantized_bytes(written[name][0], torch.bfloat16, "")
    assert 0.8 * model.weight_bytes <= estimate <= 1.25 * model.weight_bytes


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_admission_estimate_on_the_fly(quantization: str, tmp_path: Path) -> None:
    from registry.quantization.estimate import estimate_quantized_bytes
    from tests.tiny_models import make_tiny_model_dir

    model_dir = make_tiny_model_dir(
        tmp_path / "dense", "llama", seed=3, hidden_size=128, intermediate_size=256
    )
    model = build(model_dir, torch.device("cpu"), LoadOptions(quantization=quantization))
    estimate = estimate_quantized_bytes(model_dir, torch.bfloat16, quantization)
    assert 0.8 * model.weight_bytes <= estimate <= 1.25 * model.weight_bytes


def test_qwen2_biases_and_a_quantized_lm_head(tmp_path: Path) -> None:
    """q/k/v biases load as dense shards of the fused quantized projection; a checkpoint that also
    quantizes lm_head (GPTQModel's lm_head=true) gets a quantized output projection."""
    from architectures.qwen2 import build as build_qwen2

    model_dir, reference = ck.write_checkpoint(
        tmp_path / "qwen2-gptq",
        ck.gptq_config(4, 32, False, False),
        ck.gptq_layer(4, 32, False, False),
        seed=9,
        arch="qwen2",
        lm_head=True,
    )
    model = build_qwen2(model_dir, torch.device("cpu"), LoadOptions(dtype=torch.float32))
    assert isinstance(model.network.lm_head, GroupedIntLinear)
    assert model.network.model.layers[0].self_attn.qkv_proj.bias is not None
    with torch.no_grad():
        expected = reference(_ids()).logits
    got = model.forward(_ids())
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())


def test_checkpoint_with_fused_projections(written, tmp_path: Path) -> None:
    """A checkpoint that stores q/k/v and gate/up already fused (Phi-3's layout), quantized: the same
    model as the one that stores them apart."""
    import json

    from safetensors.torch import load_file, save_file

    source, _ = written["gptq-4-g32-asym"]
    tensors = load_file(source / "model.safetensors")
    groups = {
        "self_attn": (("q_proj", "k_proj", "v_proj"), "qkv_proj"),
        "mlp": (("gate_proj", "up_proj"), "gate_up_proj"),
    }
    for layer in range(2):
        for block, (parts, fused) in groups.items():
            prefix = f"model.layers.{layer}.{block}"
            for suffix in ("qweight", "qzeros", "scales"):
                tensors[f"{prefix}.{fused}.{suffix}"] = torch.cat(
                    [tensors.pop(f"{prefix}.{p}.{suffix}") for p in parts], dim=1
                )
            g_idx = [tensors.pop(f"{prefix}.{p}.g_idx") for p in parts]
            tensors[f"{prefix}.{fused}.g_idx"] = g_idx[0]
    (tmp_path / "fused").mkdir()
    save_file(tensors, str(tmp_path / "fused" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "fused" / "config.json").write_text(
        json.dumps(json.loads((source / "config.json").read_text()))
    )
    fused = build(tmp_path / "fused", torch.device("cpu"), LoadOptions(dtype=torch.float32))
    apart = build(source, torch.device("cpu"), LoadOptions(dtype=torch.float32))
    assert torch.equal(fused.forward(_ids()), apart.forward(_ids()))
