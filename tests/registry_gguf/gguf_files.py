"""GGUF files written by the tests with the `gguf` package's own writer, the way llama.cpp's
convert_hf_to_gguf.py writes them: llama.cpp's tensor names (from gguf's own name map), the Q/K row
permutation for the llama architecture, 1-D tensors kept in F32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
GGUF_ARCH_NAME = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = config.rope_parameters["rope_theta"]
    return float(theta)


def gguf_tensors_of(model: Any, arch: str) -> dict[str, np.ndarray]:
    """llama.cpp name → float32 array, as convert_hf_to_gguf.py lays them out (before quantization)."""
    config = model.config
    name_map = gguf.get_tensor_name_map(ARCHS[arch], config.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp writes no output tensor for tied embeddings
        base, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(base)
        assert name is not None, hf_name
        data = tensor.detach().float().numpy().copy()
        if GGUF_ARCH_NAME[arch] == "llama":
            if base.endswith("q_proj"):
                data = llama_cpp_permute(data, config.num_attention_heads, config.num_attention_heads)
            elif base.endswith("k_proj"):
                data = llama_cpp_permute(data, config.num_attention_heads, config.num_key_value_heads)
        out[f"{name}.{suffix}"] = data
    return out


def write_gguf(
    path: Path,
    config: Any,
    arch: str,
    tensors: dict[str, np.ndarray | tuple[np.ndarray, gguf.GGMLQuantizationType]],
    *,
    name: str = "tiny test model",
    metadata: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a GGUF: hyperparameters from a transformers config, then the tensors — a float array,
    or (raw bytes, ggml type) for data that is already quantized."""
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH_NAME[arch])
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # as convert_hf_to_gguf.py does
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if metadata is not None:
        metadata(writer)
    for tensor_name, value in tensors.items():
        if isinstance(value, tuple):
            raw, qtype = value
            writer.add_tensor(tensor_name, raw, raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def quantized(tensors: dict[str, np.ndarray], qtype: gguf.GGMLQuantizationType) -> dict[str, Any]:
    """2-D tensors quantized with gguf.quants.quantize (as llama.cpp does); 1-D ones stay F32."""
    out: dict[str, Any] = {}
    for name, data in tensors.items():
        out[name] = (gguf.quants.quantize(data, qtype), qtype) if data.ndim == 2 else data
    return out


def write_model_gguf(
    path: Path,
    model: Any,
    arch: str,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    **kwargs: Any,
) -> Path:
    tensors = gguf_tensors_of(model, arch)
    payload = quantized(tensors, qtype) if qtype != gguf.GGMLQuantizationType.F32 else dict(tensors)
    return write_gguf(path, model.config, arch, payload, **kwargs)


def q8_0_reference(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 dequantized by hand (ggml's block_q8_0: an f16 scale, then 32 int8 quants)."""
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * quants).reshape(shape)


# Byte offsets of the f16 scales in each block (ggml-common.h), which random bytes must keep finite.
F16_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}


def random_blocks(rng: np.random.Generator, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """Random quantized data of a ggml type for a [rows, cols] tensor, scales small and finite."""
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    raw = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[type_name]:
        scales = rng.uniform(1e-3, 2e-2, size=raw.shape[:2]).astype(np.float16)
        raw[..., offset : offset + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def transformers_dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """transformers' own torch dequantizer (independent of gguf.quants) as the reference."""
    from transformers.integrations.gguf.dequant import dequantize

    qtype = gguf.GGMLQuantizationType[type_name]
    values = dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(qtype), torch.float32)
    return values.numpy().reshape(shape)
