"""Real weights: SmolLM2-135M-Instruct through our Llama against transformers."""

from __future__ import annotations

import pytest
import torch

from architectures import llama
from registry import KvCacheOptions, LoadOptions
from tests.real_model import PROMPT, greedy_tokens, smollm2_hf_dir, transformers_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ours():
    return llama.build(
        smollm2_hf_dir(), torch.device("cpu"), LoadOptions(kv_cache=KvCacheOptions(max_seq_len=256))
    )


def test_greedy_decoding_matches_transformers(ours):
    ref, tokenizer = transformers_smollm2()
    prompt = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :].tolist()
    tokens = greedy_tokens(ours, prompt, 16)
    assert tokens == expected
    assert " Paris" in tokenizer.decode(tokens)


def test_logits_match_transformers_on_random_tokens(ours):
    ref, _ = transformers_smollm2()
    ids = torch.randint(0, ours.config.vocab_size, (2, 48))
    with torch.no_grad():
        expected = ref(ids).logits
    diff = (ours.forward(ids) - expected).abs().max().item()
    assert diff <= 1e-3, f"max abs diff {diff}"
