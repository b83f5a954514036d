"""`import-gguf --keep-quant int4` of the real SmolLM2-135M Q4_1 file: its 210 projections keep their
Q4_1 blocks, and the model computes what the plain (dequantized float32) import computes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from architectures import llama
from architectures.quantized_linear import QuantizedLinear
from registry import KvCacheOptions, LoadOptions
from registry.gguf import is_complete_import
from registry.gguf_import import main_import
from tests.real_model import CACHE_ROOT, PROMPT, greedy_tokens, smollm2_gguf

from .test_smollm2 import imported  # noqa: F401  (the plain import, a module fixture)

pytestmark = pytest.mark.slow
KEPT = CACHE_ROOT / "smollm2-135m-gguf-keep-int4"
OPTIONS = {"kv_cache": KvCacheOptions(max_seq_len=64)}


@pytest.fixture(scope="module")
def kept() -> Path:
    source = smollm2_gguf()
    if not is_complete_import(KEPT, source, "float32", keep_quant="int4"):
        start = time.monotonic()
        args = [str(source), str(KEPT), "--keep-quant", "int4", "--no-tokenizer", "--no-progress", "--force"]
        assert main_import(args) == 0
        print(f"import --keep-quant int4: {time.monotonic() - start:.1f}s")
    return KEPT


def _kinds(model) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for module in model.network.modules():
        if isinstance(module, QuantizedLinear):
            kinds[f"{type(module).__name__}/{module.kernel}"] = (
                kinds.get(f"{type(module).__name__}/{module.kernel}", 0) + 1
            )
    return kinds


def test_config_lists_every_projection_as_q4_1(kept):
    q = json.loads((kept / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "gguf" and q["keep_quant"] == "int4"
    assert len(q["tensor_types"]) == 210 and set(q["tensor_types"].values()) == {"Q4_1"}
    marker = json.loads((kept / "gguf_import.json").read_text())
    print(f"model.safetensors: {marker['files']['model.safetensors'] / 1e6:.0f} MB")


def test_float32_logits_equal_the_plain_import(kept, imported):  # noqa: F811
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(7))
    plain = llama.build(imported, torch.device("cpu"), LoadOptions(dtype=torch.float32, **OPTIONS))
    expected = plain.forward(ids)
    plain_bytes = plain.weight_bytes
    del plain
    model = llama.build(kept, torch.device("cpu"), LoadOptions(dtype=torch.float32, **OPTIONS))
    assert model.quantization == "gguf-q4_1"
    assert _kinds(model) == {"GroupedIntLinear/dequantize": 30 * 4}  # qkv, o, gate_up, down per layer
    diff = (model.forward(ids) - expected).abs().max().item()
    bound = expected.abs().max().item()
    print(
        f"float32: max|Δlogit| {diff:.3g} of max|logit| {bound:.3g}; weights {model.weight_bytes / 1e6:.0f} MB "
        f"vs plain {plain_bytes / 1e6:.0f} MB"
    )
    assert diff <= 1e-4 * bound


def test_bfloat16_kernel_path_answers_paris(kept, imported):  # noqa: F811
    tokenizer = Tokenizer.from_file(str(imported / "tokenizer.json"))
    model = llama.build(kept, torch.device("cpu"), LoadOptions(**OPTIONS))  # CPU default: bfloat16
    assert model.quantization == "gguf-q4_1"
    print(f"bfloat16: layers {_kinds(model)}, weights {model.weight_bytes / 1e6:.0f} MB")
    assert 100e6 <= model.weight_bytes <= 130e6
    prompt = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False).ids])
    tokens = greedy_tokens(model, prompt, 6)
    assert " Paris" in tokenizer.decode(tokens), tokenizer.decode(tokens)
