"""Numeric checks of a parsed config.json, and of the checkpoint's shapes against it, run before
anything is allocated: every number finite and in range (the ranges of the ModelInfo fields that
report it, so describing a loaded model cannot fail), INVALID_ARGUMENT naming the key and the value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .errors import InvalidConfig

if TYPE_CHECKING:
    from .config import ModelConfig
    from .safetensors_loader import TensorEntry

# ModelInfo reports these as uint32; positions and token ids travel as int32 in torch index tensors.
UINT32_MAX = 2**32 - 1
INT32_MAX = 2**31 - 1
# JSON numbers past this many digits are refused while parsing (Python refuses 4300+ with ValueError).
MAX_INT_DIGITS = 30

# config key → the ModelConfig field, with its upper bound.
_INT_FIELDS: dict[str, tuple[str, int]] = {
    "vocab_size": ("vocab_size", INT32_MAX),
    "hidden_size": ("hidden_size", INT32_MAX),
    "intermediate_size": ("intermediate_size", INT32_MAX),
    "num_hidden_layers": ("num_hidden_layers", UINT32_MAX),
    "num_attention_heads": ("num_attention_heads", UINT32_MAX),
    "num_key_value_heads": ("num_key_value_heads", UINT32_MAX),
    "head_dim": ("head_dim", UINT32_MAX),
    "max_position_embeddings": ("max_position_embeddings", INT32_MAX),
}


def parse_json_int(text: str) -> int:
    """`parse_int` of json.loads: a bounded number of digits (no quadratic conversion, no ValueError)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _bad(key: str, value: Any, why: str) -> InvalidConfig:
    return InvalidConfig(f"config.json: {key} = {value!r} {why}")


def _finite_positive(key: str, value: float | None, *, at_least: float | None = None) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value <= 0:
        raise _bad(key, value, "must be a finite positive number")
    if at_least is not None and value < at_least:
        raise _bad(key, value, f"must be at least {at_least}")


def check_config_numbers(config: ModelConfig, raw: Mapping[str, Any] | None = None) -> None:
    """Every number of `config` finite and in range; raises InvalidConfig naming the key (`raw`, the
    JSON object, tells which of the two rope forms it used)."""
    for key, (attr, limit) in _INT_FIELDS.items():
        value = getattr(config, attr)
        if value > limit:
            raise _bad(key, value, f"is out of range (at most {limit})")
    for window in config.layer_sliding_windows:
        if window is not None and window > UINT32_MAX:
            raise _bad("sliding_window", window, f"is out of range (at most {UINT32_MAX})")
    if config.num_attention_heads * config.head_dim > INT32_MAX:
        raise _bad("head_dim", config.head_dim, "times num_attention_heads is out of range")
    _finite_positive("rms_norm_eps", config.rms_norm_eps)
    if config.rms_norm_eps >= 1:
        raise _bad("rms_norm_eps", config.rms_norm_eps, "must be below 1")
    _finite_positive("rope_theta", config.rope_theta)
    r = config.rope_scaling
    key = "rope_parameters" if "rope_parameters" in (raw or {}) else "rope_scaling"
    if r.rope_type != "default":
        _finite_positive(f"{key}.factor", r.factor)
    if r.rope_type == "dynamic" and r.factor < 1:
        raise _bad(f"{key}.factor", r.factor, "must be at least 1 for dynamic scaling")
    for name in ("low_freq_factor", "high_freq_factor", "attention_factor", "mscale", "mscale_all_dim"):
        _finite_positive(f"{key}.{name}", getattr(r, name))
    for name in ("beta_fast", "beta_slow"):
        value = getattr(r, name)
        if not math.isfinite(value):
            raise _bad(f"{key}.{name}", value, "must be a finite number")
    if r.rope_type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
        raise _bad(f"{key}.high_freq_factor", r.high_freq_factor, "must exceed low_freq_factor")
    if r.original_max_position_embeddings is not None and r.original_max_position_embeddings > INT32_MAX:
        raise _bad(
            f"{key}.original_max_position_embeddings", r.original_max_position_embeddings, "is out of range"
        )
    if config.position_limit > INT32_MAX:
        raise _bad(
            "max_position_embeddings", config.max_position_embeddings, "times the rope factor is out of range"
        )


def check_checkpoint_shapes(config: ModelConfig, entries: Mapping[str, TensorEntry]) -> None:
    """The embedding (and an untied head) have the shapes config.json implies, before any weight is
    allocated: a vocab_size of 2^31 over a small checkpoint is the config's fault, not memory's."""
    want = (config.vocab_size, config.hidden_size)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        entry = entries.get(name)
        if entry is not None and tuple(entry.shape) != want:
            raise InvalidConfig(
                f"config.json: vocab_size {config.vocab_size} and hidden_size {config.hidden_size} give "
                f"{name} the shape {list(want)}, but the checkpoint's is {list(entry.shape)}"
            )


__all__ = ["check_checkpoint_shapes", "check_config_numbers", "parse_json_int"]
