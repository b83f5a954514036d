"""config.json from a GGUF file's metadata: llama.cpp's hyperparameter keys → Hugging Face's, for the
llama (also Mistral) and qwen2 architectures, including rope scaling and Llama 3's `rope_freqs`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .reader import GgufFile, GgufImportError, GgufTensor, dequantize

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")


def _uniform_int(gf: GgufFile, name: str, default: Any = None, *, required: bool = False) -> int | None:
    """An integer hyperparameter; llama.cpp may store a per-layer array, which must be uniform here."""
    value = gf.key(name, default, required=required)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GgufImportError(
                f"{gf.path}: {gf.architecture}.{name} differs between layers ({value}); "
                "models with per-layer shapes are not supported"
            )
        value = value[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise GgufImportError(
            f"{gf.path}: {gf.architecture}.{name} must be a positive integer, got {value!r}"
        )
    return value


def _is_mistral(gf: GgufFile) -> bool:
    """llama.cpp writes Mistral checkpoints with the llama architecture; the name tells them apart
    (as in transformers' GGUF loader), and so does a sliding window, which HF Llama cannot express."""
    names = " ".join(str(gf.metadata.get(k, "")) for k in ("general.name", "general.basename"))
    return "mistral" in names.lower() or gf.key("attention.sliding_window") is not None


def build_config(gf: GgufFile, dtype: str = "float32") -> dict[str, Any]:
    """The HF config.json for a GGUF file (transformers 4.x keys, which 5.x also reads)."""
    arch = gf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GgufImportError(
            f"{gf.path}: architecture {arch!r} is not supported (supported: llama — also Mistral —, qwen2)"
        )
    hidden = _uniform_int(gf, "embedding_length", required=True)
    layers = _uniform_int(gf, "block_count", required=True)
    heads = _uniform_int(gf, "attention.head_count", required=True)
    kv_heads = _uniform_int(gf, "attention.head_count_kv", heads)
    intermediate = _uniform_int(gf, "feed_forward_length", required=True)
    context = _uniform_int(gf, "context_length", required=True)
    assert hidden and layers and heads and kv_heads and intermediate and context  # for the type checker
    if heads % kv_heads:
        raise GgufImportError(
            f"{gf.path}: head_count ({heads}) is not a multiple of head_count_kv ({kv_heads})"
        )
    head_dim = _uniform_int(gf, "attention.key_length")
    if head_dim is None:  # older files state it only through the shape of the query projection
        q = gf.tensors.get("blk.0.attn_q.weight")
        head_dim = q.shape[0] // heads if q is not None and q.shape[0] % heads == 0 else hidden // heads
    value_dim = _uniform_int(gf, "attention.value_length") or head_dim
    if value_dim != head_dim:
        raise GgufImportError(
            f"{gf.path}: key_length {head_dim} != value_length {value_dim} is not supported"
        )
    if head_dim % 2:
        raise GgufImportError(f"{gf.path}: head dimension {head_dim} must be even for rotary embeddings")
    rope_dim = _uniform_int(gf, "rope.dimension_count") or head_dim
    if rope_dim != head_dim:
        raise GgufImportError(
            f"{gf.path}: rope.dimension_count {rope_dim} != head dimension {head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    eps = gf.key("attention.layer_norm_rms_epsilon", required=True)
    theta = float(gf.key("rope.freq_base", 10000.0))  # llama.cpp's default when the key is absent

    embed = gf.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise GgufImportError(f"{gf.path}: tensor 'token_embd.weight' is missing")
    vocab = embed.shape[0]
    declared_vocab = gf.key("vocab_size")
    if declared_vocab is not None and declared_vocab != vocab:
        raise GgufImportError(
            f"{gf.path}: {arch}.vocab_size is {declared_vocab} but token_embd.weight has {vocab} rows"
        )

    if arch == "qwen2":
        architecture, model_type = "Qwen2ForCausalLM", "qwen2"
    elif _is_mistral(gf):
        architecture, model_type = "MistralForCausalLM", "mistral"
    else:
        architecture, model_type = "LlamaForCausalLM", "llama"

    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(eps),
        "rope_theta": theta,
        "max_position_embeddings": context,
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    rope_scaling = _rope_scaling(gf, theta, head_dim)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if model_type == "llama":
        config["attention_bias"] = _llama_attention_bias(gf, layers)
        config["mlp_bias"] = False
    elif model_type == "mistral":
        config["sliding_window"] = _uniform_int(gf, "attention.sliding_window")
    else:
        # llama.cpp runs Qwen2 with full attention in every layer; so does this config.
        config["use_sliding_window"] = False
        config["sliding_window"] = None
        config["max_window_layers"] = layers
    for key, field in (
        ("bos_token_id", "bos_token_id"),
        ("eos_token_id", "eos_token_id"),
        ("pad_token_id", "padding_token_id"),
    ):
        value = gf.metadata.get(f"tokenizer.ggml.{field}")
        if isinstance(value, int) and 0 <= value < vocab:
            config[key] = value
    return config


def _llama_attention_bias(gf: GgufFile, layers: int) -> bool:
    """HF Llama's attention_bias puts a bias on q, k, v and o alike: all four or none."""
    parts = ("attn_q", "attn_k", "attn_v", "attn_output")
    present = [f"blk.{i}.{p}.bias" in gf.tensors for i in range(layers) for p in parts]
    if any(present) and not all(present):
        raise GgufImportError(
            f"{gf.path}: only some attention projections have a bias; HF Llama needs q, k, v and o "
            "biases in every layer or none"
        )
    return all(present)


def _rope_scaling(gf: GgufFile, theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = gf.key("rope.scaling.type")
    factor = gf.key("rope.scaling.factor")
    if kind is None and gf.key("rope.scale_linear") is not None:  # the key older files carry
        kind, factor = "linear", gf.key("rope.scale_linear")
    freqs = gf.tensors.get("rope_freqs.weight")
    if freqs is not None:
        if gf.architecture != "llama" or kind not in (None, "none"):
            raise GgufImportError(
                f"{gf.path}: tensor 'rope_freqs.weight' together with rope scaling {kind!r} is not supported"
            )
        return _llama3_rope_from_factors(gf, freqs, theta, head_dim)
    if kind in (None, "none"):
        return None
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise GgufImportError(f"{gf.path}: rope scaling {kind!r} without a valid rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        attn_factor = gf.key("rope.scaling.attn_factor")
        if attn_factor is not None and not math.isclose(float(attn_factor), 1.0):
            # llama.cpp multiplies its own YaRN magnitude scale by this; HF's attention_factor replaces it.
            raise GgufImportError(f"{gf.path}: YaRN rope.scaling.attn_factor {attn_factor} is not supported")
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
        original = gf.key("rope.scaling.original_context_length")
        if original is not None:
            scaling["original_max_position_embeddings"] = int(original)
        for key, name in (
            ("rope.scaling.yarn_beta_fast", "beta_fast"),
            ("rope.scaling.yarn_beta_slow", "beta_slow"),
        ):
            if gf.key(key) is not None:
                scaling[name] = float(gf.key(key))
        return scaling
    raise GgufImportError(
        f"{gf.path}: rope scaling type {kind!r} is not supported (supported: linear, yarn, llama3)"
    )


def _llama3_factors(
    inv_freq: np.ndarray, factor: float, low: float, high: float, original: float
) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 scaling (convert_hf_to_gguf.py, LlamaModel)."""
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _llama3_rope_from_factors(
    gf: GgufFile, tensor: GgufTensor, theta: float, head_dim: int
) -> dict[str, Any]:
    """Recover Llama 3 rope scaling from the per-frequency factors llama.cpp stores.

    The factors are 1 (high frequencies), `factor` (low ones) and `1 / ((1 - s) / factor + s)` in
    between, with `s = original / wavelen / (high - low) - low / (high - low)`: linear in 1/wavelen.
    Only `original / (high - low)` and `low / (high - low)` are determined, so `low` is fixed at 1 (the
    published value); the result is checked by recomputing every factor.
    """
    where = f"{gf.path}: tensor 'rope_freqs.weight'"
    factors = np.asarray(dequantize(gf, tensor), dtype=np.float64).reshape(-1)
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv_freq.shape or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise GgufImportError(
            f"{where} must hold {inv_freq.size} positive factors, got shape {list(tensor.shape)}"
        )
    factor = float(factors.max())
    if math.isclose(factor, 1.0, rel_tol=1e-6) and np.allclose(factors, 1.0, rtol=1e-6):
        return {"rope_type": "default"}
    wavelen = 2 * math.pi / inv_freq
    ones = np.isclose(factors, 1.0, rtol=1e-5)
    full = np.isclose(factors, factor, rtol=1e-5)
    medium = ~ones & ~full
    if medium.sum() >= 2:
        smooth = (factor / factors[medium] - 1) / (factor - 1)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)  # smooth = a / wavelen - b
        a, b = float(slope), float(-intercept)
    elif ones.any() and full.any():
        # No (or one) smoothed frequency: put each boundary between its two neighbouring wavelengths.
        high_wl = math.sqrt(wavelen[ones].max() * wavelen[~ones].min())
        low_wl = math.sqrt(wavelen[~full].max() * wavelen[full].min())
        a, b = low_wl / (low_wl / high_wl - 1), 1 / (low_wl / high_wl - 1)
    else:
        a = b = 0.0
    if a > 0 and b > 0:
        # low = 1 gives high - low = 1 / b and original = a / b (an integer context length). The fit
        # sees float32 factors: prefer the roundest `high` that reproduces them.
        original = round(a / b)
        for high in (round(1 + 1 / b, 2), round(1 + 1 / b, 4), 1 + 1 / b):
            if np.allclose(
                _llama3_factors(inv_freq, factor, 1.0, high, original), factors, rtol=1e-4, atol=0
            ):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    raise GgufImportError(
        f"{where} does not follow Llama 3 rope scaling; it cannot be expressed in config.json"
    )
