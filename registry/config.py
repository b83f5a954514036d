"""ModelConfig: config.json parsed once into a frozen dataclass.

Every Hugging Face quirk we accept is absorbed here, so that model code reads plain fields:
head_dim explicit or derived, GQA, tied embeddings, rope settings in the transformers 4.x form
(`rope_theta` + `rope_scaling`) and the 5.x form (`rope_parameters`), `torch_dtype` vs `dtype`, and
sliding windows (Mistral: every layer; Qwen2: `use_sliding_window` from `max_window_layers` on, or an
explicit `layer_types` list).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .config_checks import check_config_numbers, parse_json_int
from .errors import InvalidConfig

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")
ROPE_TYPE_ALIASES = {"su": "longrope"}  # Phi-3 checkpoints of the 4.x era
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
_MISSING = object()


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. Fields a rope type does not use keep their defaults."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    # longrope (Phi-3): per-frequency divisors below / beyond original_max_position_embeddings
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    # Share of head_dim that is rotated (Phi-3, some Phi/StableLM configs); the rest passes through.
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: RopeScaling
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    # Window per layer (None = full attention), len == num_hidden_layers.
    layer_sliding_windows: tuple[int | None, ...]
    dtype: str | None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    quantization_method: str | None = None
    # The whole config.json, read-only: an architecture reads its own fields through the typed
    # accessors below (get_int, get_float, ...) instead of adding them here.
    raw: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)

    # -- architecture-specific fields ----------------------------------------------------------
    def get_int(self, name: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        """config.json's integer `name` (null or absent: `default`; no default: required)."""
        value = _get(self.raw, name, default)
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise InvalidConfig(f"config.json: {name} must be an integer{bound}, got {value!r}")
        return value

    def get_float(self, name: str, default: Any = _MISSING, *, positive: bool = False) -> float:
        value = _get(self.raw, name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
            what = "a positive number" if positive else "a number"
            raise InvalidConfig(f"config.json: {name} must be {what}, got {value!r}")
        return float(value)

    def get_optional_float(self, name: str) -> float | None:
        """A number or null/absent (None), e.g. softcaps that only some checkpoints set."""
        return None if self.raw.get(name) is None else self.get_float(name)

    def get_bool(self, name: str, default: Any = _MISSING) -> bool:
        value = _get(self.raw, name, default)
        if not isinstance(value, bool):
            raise InvalidConfig(f"config.json: {name} must be true or false, got {value!r}")
        return value

    def get_str(self, name: str, default: Any = _MISSING, *, choices: tuple[str, ...] = ()) -> str:
        value = _get(self.raw, name, default)
        if not isinstance(value, str) or (choices and value not in choices):
            allowed = f" (one of {', '.join(choices)})" if choices else ""
            raise InvalidConfig(f"config.json: {name} must be a string{allowed}, got {value!r}")
        return value

    def get_int_list(self, name: str, default: Any = _MISSING) -> tuple[int, ...]:
        """A list of integers (e.g. mlp_only_layers)."""
        value = _get(self.raw, name, default)
        if not isinstance(value, (list, tuple)) or any(
            isinstance(x, bool) or not isinstance(x, int) for x in value
        ):
            raise InvalidConfig(f"config.json: {name} must be a list of integers, got {value!r}")
        return tuple(value)

    @property
    def sliding_window(self) -> int | None:
        """The window used by any layer (None when every layer attends fully)."""
        windows = [w for w in self.layer_sliding_windows if w is not None]
        return max(windows) if windows else None

    @property
    def position_limit(self) -> int:
        """Positions a request may use: dynamic NTK scaling extends the trained length by its factor."""
        if self.rope_scaling.rope_type == "dynamic":
            return int(self.max_position_embeddings * self.rope_scaling.factor)
        return self.max_position_embeddings

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        return cls.from_hf(read_config_json(path))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], architecture: str | None = None) -> ModelConfig:
        if not isinstance(cfg, dict):
            raise InvalidConfig("config.json: the top level must be a JSON object")
        arch = architecture or _architecture_of(cfg)
        hidden = _int(cfg, "hidden_size")
        heads = _int(cfg, "num_attention_heads")
        kv_heads = _int(cfg, "num_key_value_heads", heads)
        layers = _int(cfg, "num_hidden_layers")
        if heads % kv_heads:
            raise InvalidConfig(
                f"config.json: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise InvalidConfig(
                    f"config.json: hidden_size ({hidden}) is not divisible by num_attention_heads ({heads})"
                )
            head_dim = hidden // heads
        else:
            head_dim = _int(cfg, "head_dim")
        if head_dim % 2:
            raise InvalidConfig(f"config.json: head_dim must be even for rotary embeddings, got {head_dim}")
        # Gemma names its activation `hidden_activation` (and may keep a stale `hidden_act`).
        act = _str(cfg, "hidden_activation", "") or _str(cfg, "hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise InvalidConfig(
                f"config.json: hidden_act {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})"
            )
        max_pos = _int(cfg, "max_position_embeddings", 2048)
        rope_theta, rope_scaling = _parse_rope(cfg)
        rotary_dim = int(head_dim * rope_scaling.partial_rotary_factor)
        if rotary_dim % 2 or rotary_dim == 0:
            raise InvalidConfig(
                f"config.json: partial_rotary_factor {rope_scaling.partial_rotary_factor} gives an odd or "
                f"empty rotary dimension {rotary_dim} of head_dim {head_dim}"
            )
        for key in ("short_factor", "long_factor"):
            factors = getattr(rope_scaling, key)
            if factors is not None and len(factors) != rotary_dim // 2:
                raise InvalidConfig(
                    f"config.json: rope {key} has {len(factors)} entries, expected {rotary_dim // 2} "
                    f"(half the rotary dimension {rotary_dim})"
                )
        # 5.x writes `dtype` (possibly null) and may keep a legacy `torch_dtype`: the one that is set counts.
        field = "dtype" if cfg.get("dtype") is not None else "torch_dtype"
        dtype = cfg.get(field)
        if dtype is not None:
            if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in SUPPORTED_DTYPES:
                raise InvalidConfig(
                    f"config.json: {field} {dtype!r} is not supported (supported: {', '.join(SUPPORTED_DTYPES)})"
                )
            dtype = dtype.removeprefix("torch.")
        quant = cfg.get("quantization_config")
        quant_method = None
        if quant is not None:
            if not isinstance(quant, dict):
                raise InvalidConfig("config.json: quantization_config must be an object")
            quant_method = str(quant.get("quant_method", "unknown"))
        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(eos)
        config = cls(
            architecture=arch,
            model_type=_str(cfg, "model_type", ""),
            vocab_size=_int(cfg, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act=act,
            rms_norm_eps=_float(cfg, "rms_norm_eps", 1e-6),
            max_position_embeddings=max_pos,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=_bool(cfg, "tie_word_embeddings", False),
            attention_bias=_bool(cfg, "attention_bias", False),
            mlp_bias=_bool(cfg, "mlp_bias", False),
            layer_sliding_windows=_layer_windows(cfg, layers),
            dtype=dtype,
            bos_token_id=cfg.get("bos_token_id") if isinstance(cfg.get("bos_token_id"), int) else None,
            eos_token_id=eos,
            quantization_method=quant_method,
            raw=MappingProxyType(dict(cfg)),
        )
        check_config_numbers(config, cfg)
        return config


def read_config_json(path: Path) -> dict[str, Any]:
    """Read config.json with errors that say what is wrong with it."""
    if not path.is_file():
        raise InvalidConfig(f"{path}: config.json not found in the model directory")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_int=parse_json_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # too deep, too many digits
        raise InvalidConfig(f"{path}: not valid JSON ({str(exc)[:200] or type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise InvalidConfig(f"{path}: the top level must be a JSON object")
    return data


def _architecture_of(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str) or not archs[0]:
        raise InvalidConfig('config.json: "architectures" must be a non-empty list of names')
    return archs[0]


def _get(cfg: Mapping[str, Any], name: str, default: Any) -> Any:
    # null means "not set", as in transformers (e.g. num_key_value_heads: null → num_attention_heads).
    value = cfg.get(name)
    if value is None:
        value = default
    if value is _MISSING:
        raise InvalidConfig(f"config.json: required field {name!r} is missing")
    return value


def _int(cfg: dict[str, Any], name: str, default: Any = _MISSING) -> int:
    value = _get(cfg, name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidConfig(f"config.json: {name} must be a positive integer, got {value!r}")
    return value


def _float(cfg: dict[str, Any], name: str, default: Any = _MISSING) -> float:
    value = _get(cfg, name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidConfig(f"config.json: {name} must be a positive number, got {value!r}")
    return float(value)


def _bool(cfg: dict[str, Any], name: str, default: bool) -> bool:
    value = cfg.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidConfig(f"config.json: {name} must be true or false, got {value!r}")
    return value


def _str(cfg: dict[str, Any], name: str, default: str) -> str:
    value = cfg.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidConfig(f"config.json: {name} must be a string, got {value!r}")
    return value


def _parse_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling]:
    """Both forms: 4.x `rope_theta` + `rope_scaling`, 5.x `rope_parameters` (theta inside)."""
    params = cfg.get("rope_parameters")
    field = "rope_parameters"
    if params is None:
        params = cfg.get("rope_scaling")
        field = "rope_scaling"
    if params is not None and not isinstance(params, dict):
        raise InvalidConfig(f"config.json: {field} must be an object or null, got {params!r}")
    params = dict(params or {})
    if isinstance(params.get("full_attention"), dict):
        # 5.x Gemma 3: one entry per layer type; the global (full attention) one is the model's
        # rope, and the architecture reads `sliding_attention` itself.
        field += ".full_attention"
        params = dict(params["full_attention"])
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise InvalidConfig(f"config.json: rope_theta must be a positive number, got {theta!r}")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    rope_type = ROPE_TYPE_ALIASES.get(rope_type, rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise InvalidConfig(
            f"config.json: {field}.rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    kwargs: dict[str, Any] = {"rope_type": rope_type}
    for key in (
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "mscale",
        "mscale_all_dim",
    ):
        if params.get(key) is not None:
            value = params[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidConfig(f"config.json: {field}.{key} must be a number, got {value!r}")
            kwargs[key] = float(value)
    if params.get("original_max_position_embeddings") is not None:
        kwargs["original_max_position_embeddings"] = _int(params, "original_max_position_embeddings")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial is not None:
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise InvalidConfig(f"config.json: partial_rotary_factor must be in (0, 1], got {partial!r}")
        kwargs["partial_rotary_factor"] = float(partial)
    if rope_type == "longrope":
        _parse_longrope(cfg, params, field, kwargs)
    if params.get("truncate") is not None:
        if not isinstance(params["truncate"], bool):  # bool("false") would be True
            raise InvalidConfig(
                f"config.json: {field}.truncate must be true or false, got {params['truncate']!r}"
            )
        kwargs["truncate"] = params["truncate"]
    if rope_type in ("linear", "dynamic", "yarn", "llama3") and "factor" not in kwargs:
        raise InvalidConfig(f"config.json: {field}.factor is required for rope_type {rope_type!r}")
    return float(theta), RopeScaling(**kwargs)


def _parse_longrope(cfg: dict[str, Any], params: dict[str, Any], field: str, kwargs: dict[str, Any]) -> None:
    """Phi-3 LongRoPE: short/long factor lists (one per rotary frequency) and the pretrained length
    (in the rope dict or, 4.x, at the top level); `factor` defaults to max / original positions."""
    for key in ("short_factor", "long_factor"):
        value = params.get(key)
        if (
            not isinstance(value, list)
            or not value
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in value)
        ):
            raise InvalidConfig(
                f"config.json: {field}.{key} must be a non-empty list of numbers, got {value!r}"
            )
        kwargs[key] = tuple(float(x) for x in value)
    if "original_max_position_embeddings" not in kwargs:
        kwargs["original_max_position_embeddings"] = _int(cfg, "original_max_position_embeddings")
    if "factor" not in kwargs:
        max_pos = _int(cfg, "max_position_embeddings", 2048)
        kwargs["factor"] = max_pos / kwargs["original_max_position_embeddings"]


def _layer_windows(cfg: dict[str, Any], layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if "use_sliding_window" in cfg and not _bool(cfg, "use_sliding_window", False):
        window = None  # Qwen2-MoE writes sliding_window 0 next to use_sliding_window false
    if window is not None:
        window = _int(cfg, "sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != layers:
            raise InvalidConfig(f"config.json: layer_types must be a list of {layers} entries")
        unknown = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if unknown:
            raise InvalidConfig(f"config.json: layer_types has unsupported entries {unknown}")
        if window is None and "sliding_attention" in layer_types:
            # 5.x Qwen2 keeps use_sliding_window=false but still lists types; no window means full.
            return (None,) * layers
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window is None:
        return (None,) * layers
    if "use_sliding_window" in cfg:
        # Qwen2: layers from max_window_layers on use the window (transformers' layer_types default).
        first = cfg.get("max_window_layers", layers)
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise InvalidConfig(
                f"config.json: max_window_layers must be a non-negative integer, got {first!r}"
            )
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers
