"""GGUF tensors → HF tensors: llama.cpp's names mapped to HF's, shapes and types checked before
anything is written, and the rotary Q/K row permutation of the llama architecture undone."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .reader import GgufFile, GgufImportError, GgufTensor, can_dequantize, dequantize

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    source: GgufTensor
    shape: tuple[int, ...]  # HF shape
    unpermute_heads: int  # > 0: undo llama.cpp's rotary row permutation with this many heads
    keep: str | None = None  # --keep-quant: the block type this projection keeps (keep_quant.py)

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name → shape, in checkpoint order, for a config built by `build_config`."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim", hidden // heads)
    q_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    o_bias = config.get("attention_bias", False)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
        out[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
        out[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if q_bias:
            out[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            out[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            out[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        if o_bias:
            out[p + "self_attn.o_proj.bias"] = (hidden,)
        out[p + "mlp.gate_proj.weight"] = (inter, hidden)
        out[p + "mlp.up_proj.weight"] = (inter, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, inter)
        out[p + "input_layernorm.weight"] = (hidden,)
        out[p + "post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        out["lm_head.weight"] = (config["vocab_size"], hidden)
    return out


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor of the llama/qwen2 architectures, or None if it has none."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_NAME.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def plan_tensors(gf: GgufFile, config: dict[str, Any]) -> list[TensorPlan]:
    """Map every GGUF tensor to its HF name and check names, shapes and types, all before any
    output is written; one error lists every problem."""
    expected = expected_tensors(config)
    by_hf: dict[str, GgufTensor] = {}
    unexpected: list[str] = []
    for name, tensor in gf.tensors.items():
        if name == "rope_freqs.weight":
            continue  # folded into config["rope_scaling"]
        hf = hf_tensor_name(name)
        if hf is None or hf not in expected:
            unexpected.append(name)
        else:
            by_hf[hf] = tensor
    missing = [_gguf_name_of(hf) for hf in expected if hf not in by_hf]
    mismatched = []
    unsupported = []
    for hf, tensor in by_hf.items():
        shape = expected[hf]
        if tensor.shape != shape:
            mismatched.append(f"{tensor.name} has shape {list(tensor.shape)}, expected {list(shape)}")
        if not can_dequantize(tensor.type_name):
            unsupported.append(f"{tensor.name} ({tensor.type_name})")
    problems = []
    if unsupported:
        problems.append(f"tensor type not supported by the installed gguf package: {', '.join(unsupported)}")
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected)}")
    if mismatched:
        problems.append("; ".join(mismatched))
    if problems:
        raise GgufImportError(f"{gf.path}: " + "; ".join(problems))
    permute = config["model_type"] in ("llama", "mistral")
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    plans = []
    for hf, shape in expected.items():
        n = 0
        if permute and ".self_attn.q_proj." in hf:
            n = heads
        elif permute and ".self_attn.k_proj." in hf:
            n = kv_heads
        plans.append(TensorPlan(hf, by_hf[hf], shape, n))
    return plans


def _gguf_name_of(hf_name: str) -> str:
    for gguf_name, hf in _GLOBAL_TENSORS.items():
        if hf == hf_name:
            return gguf_name
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m:
        for gguf_part, hf_part in _LAYER_TENSORS.items():
            if hf_part == m.group(2):
                return f"blk.{m.group(1)}.{gguf_part}"
    return hf_name


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `LlamaModel.permute` of a q/k projection (weight or bias).

    llama.cpp views each head's rows as [2, head_dim/2] (HF's rotate-half halves) and transposes them
    to [head_dim/2, 2] (interleaved pairs); here rows go [n_head, head_dim/2, 2] → [n_head, 2, head_dim/2].
    """
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def convert_tensor(gf: GgufFile, plan: TensorPlan, dtype: torch.dtype) -> torch.Tensor:
    values = dequantize(gf, plan.source).reshape(plan.shape)
    if plan.unpermute_heads:
        values = unpermute_rotary(values, plan.unpermute_heads)
    return torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
