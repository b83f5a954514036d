"""ModelConfig.from_hf against transformers' own configs (the reference) and hand-written 4.x dicts."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import pytest

from registry import InvalidConfig, ModelConfig, RopeScaling
from tests.tiny_models import hf_config

ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def real(arch: str, **overrides: Any) -> tuple[Any, ModelConfig]:
    """The transformers config object and our parse of its serialized dict."""
    hf = hf_config(arch, **overrides)
    return hf, ModelConfig.from_hf(hf.to_dict(), architecture=ARCH[arch])


def hf_windows(hf: Any) -> tuple[int | None, ...]:
    """Per-layer windows the way transformers' attention modules choose them (independent of our code)."""
    if hf.model_type == "mistral":
        return (hf.sliding_window,) * hf.num_hidden_layers
    if hf.model_type == "qwen2":
        return tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)
    return (None,) * hf.num_hidden_layers


def legacy(**overrides: Any) -> dict[str, Any]:
    """A transformers-4.x-style Llama config.json, as found in many published checkpoints."""
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 320,
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    cfg.update(overrides)
    return cfg


# -- real transformers configs -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_real_config_plain_fields_match_transformers(arch: str) -> None:
    rng = random.Random(arch)
    heads = rng.choice([4, 8])
    kv = rng.choice([h for h in (1, 2, 4) if heads % h == 0])
    hf, cfg = real(
        arch,
        hidden_size=heads * 16,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        num_hidden_layers=rng.randint(1, 5),
        vocab_size=rng.randint(50, 500),
        intermediate_size=rng.randint(10, 300),
        max_position_embeddings=rng.choice([128, 4096, 32768]),
        rms_norm_eps=rng.choice([1e-5, 1e-6]),
    )
    assert cfg.architecture == ARCH[arch]
    assert cfg.model_type == arch
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "hidden_act",
        "tie_word_embeddings",
    ):
        assert getattr(cfg, name) == getattr(hf, name), name
    assert cfg.head_dim == hf.hidden_size // hf.num_attention_heads
    assert cfg.num_kv_groups == heads // kv
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.rope_scaling == RopeScaling()
    assert cfg.layer_sliding_windows == hf_windows(hf)
    assert cfg.dtype is None


def test_head_dim_explicit_overrides_the_derived_one() -> None:
    hf, cfg = real("llama", head_dim=32)  # hidden 64 / 4 heads would give 16
    assert hf.head_dim == 32
    assert cfg.head_dim == 32
    hf, cfg = real("qwen2")  # Qwen2 writes no head_dim at all
    assert "head_dim" not in hf.to_dict()
    assert cfg.head_dim == 16


def test_head_dim_null_is_derived() -> None:
    assert ModelConfig.from_hf(legacy(head_dim=None)).head_dim == 16


def test_gqa_and_mha() -> None:
    _, cfg = real("llama", num_attention_heads=8, num_key_value_heads=2, hidden_size=128)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_kv_groups) == (8, 2, 4)
    # A config without num_key_value_heads is multi-head attention (one kv head per head).
    cfg = ModelConfig.from_hf({k: v for k, v in legacy().items() if k != "num_key_value_heads"})
    assert (cfg.num_key_value_heads, cfg.num_kv_groups) == (6, 1)
    # null means "not set": transformers then uses num_attention_heads.
    assert ModelConfig.from_hf(legacy(num_key_value_heads=None)).num_key_value_heads == 6


def test_flags_tie_bias_act_eps() -> None:
    hf, cfg = real(
        "llama",
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        hidden_act="gelu",
        rms_norm_eps=1e-5,
    )
    assert cfg.tie_word_embeddings is True and cfg.attention_bias is True and cfg.mlp_bias is True
    assert cfg.hidden_act == "gelu" and cfg.rms_norm_eps == 1e-5
    cfg = ModelConfig.from_hf({k: v for k, v in legacy().items() if k != "tie_word_embeddings"})
    assert cfg.tie_word_embeddings is False and cfg.attention_bias is False and cfg.mlp_bias is False


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16,
         "beta_slow": 2, "attention_factor": 0.9},
        {"type": "linear", "factor": 2.0},
        {"rope_type": "linear", "factor": 3.5},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
)  # fmt: skip
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_real_rope_parameters(arch: str, rope: dict[str, Any]) -> None:
    hf, cfg = real(arch, rope_scaling=dict(rope), rope_theta=250000.0)
    params = hf.to_dict()["rope_parameters"]  # the transformers 5.x form
    assert "rope_scaling" not in hf.to_dict() or hf.to_dict()["rope_scaling"] == params
    assert cfg.rope_theta == params["rope_theta"] == 250000.0
    rs = cfg.rope_scaling
    assert rs.rope_type == params["rope_type"] == rope.get("rope_type", rope.get("type"))
    assert rs.factor == params["factor"]
    defaults = RopeScaling()
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                "original_max_position_embeddings"):  # fmt: skip
        assert getattr(rs, key) == params.get(key, getattr(defaults, key)), key


def test_legacy_rope_theta_and_linear_scaling() -> None:
    cfg = ModelConfig.from_hf(legacy(rope_scaling={"type": "linear", "factor": 2.0}))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(rope_type="linear", factor=2.0)


def test_legacy_llama3_scaling() -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    cfg = ModelConfig.from_hf(legacy(rope_scaling=scaling, max_position_embeddings=131072))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == RopeScaling(
        rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )  # fmt: skip
    assert cfg.max_position_embeddings == 131072


def test_legacy_without_rope_fields_uses_defaults() -> None:
    cfg = ModelConfig.from_hf({k: v for k, v in legacy().items() if k not in ("rope_theta", "rope_scaling")})
    assert cfg.rope_theta == 10000.0
    assert cfg.rope_scaling == RopeScaling()


def test_rope_parameters_win_over_legacy_fields() -> None:
    # 5.x configs may keep a stale top-level rope_theta; rope_parameters is authoritative.
    cfg = ModelConfig.from_hf(
        legacy(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_theta=1.0)
    )
    assert cfg.rope_theta == 1e6


def test_dtype_both_spellings() -> None:
    assert ModelConfig.from_hf(legacy(torch_dtype="float16")).dtype == "float16"
    assert ModelConfig.from_hf(legacy(torch_dtype="torch.float16")).dtype == "float16"
    _, cfg = real("qwen2", dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    # A 5.x dict with dtype null next to a legacy torch_dtype: the value that is set counts.
    assert ModelConfig.from_hf(legacy(dtype=None, torch_dtype="float32")).dtype == "float32"
    assert ModelConfig.from_hf(legacy(dtype="float16", torch_dtype=None)).dtype == "float16"
    assert ModelConfig.from_hf(legacy(torch_dtype=None)).dtype is None


# -- sliding windows ---------------------------------------------------------------------------


def test_mistral_window_on_every_layer() -> None:
    hf, cfg = real("mistral", sliding_window=16, num_hidden_layers=3)
    assert cfg.layer_sliding_windows == (16, 16, 16) == hf_windows(hf)
    assert cfg.sliding_window == 16
    hf, cfg = real("mistral", sliding_window=None)
    assert cfg.layer_sliding_windows == (None, None) and cfg.sliding_window is None


def test_qwen2_window_from_max_window_layers() -> None:
    hf, cfg = real(
        "qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1, num_hidden_layers=4
    )
    assert cfg.layer_sliding_windows == (None, 16, 16, 16) == hf_windows(hf)
    hf, cfg = real(
        "qwen2", use_sliding_window=False, sliding_window=16, max_window_layers=1, num_hidden_layers=4
    )
    assert cfg.layer_sliding_windows == (None,) * 4 == hf_windows(hf)
    assert cfg.sliding_window is None


def test_qwen2_legacy_dict_without_layer_types() -> None:
    base = legacy(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_hidden_layers=4, sliding_window=32
    )
    on = ModelConfig.from_hf({**base, "use_sliding_window": True, "max_window_layers": 2})
    assert on.layer_sliding_windows == (None, None, 32, 32)
    off = ModelConfig.from_hf({**base, "use_sliding_window": False, "max_window_layers": 2})
    assert off.layer_sliding_windows == (None,) * 4
    # 4.x Qwen2 ships sliding_window=max_position_embeddings with use_sliding_window false: full attention.
    assert ModelConfig.from_hf({**base, "use_sliding_window": False}).sliding_window is None


def test_explicit_layer_types() -> None:
    cfg = ModelConfig.from_hf(
        legacy(num_hidden_layers=3, sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                                     "sliding_attention"])
    )  # fmt: skip
    assert cfg.layer_sliding_windows == (8, None, 8)


def test_sliding_windows_match_transformers_on_random_qwen2_configs() -> None:
    rng = random.Random(1234)
    for _ in range(25):
        layers = rng.randint(1, 6)
        kwargs = dict(
            num_hidden_layers=layers,
            use_sliding_window=rng.random() < 0.7,
            sliding_window=rng.choice([None, rng.randint(1, 300)]),
            max_window_layers=rng.randint(0, layers + 1),
        )
        hf, cfg = real("qwen2", **kwargs)
        assert cfg.layer_sliding_windows == hf_windows(hf), kwargs


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_act": "swiglu_unknown"}, "hidden_act"),
        ({"hidden_act": 3}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "longrope_x", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"type": "weird", "factor": 2.0}}, "rope_type"),
        ({"rope_parameters": {"rope_type": "su", "rope_theta": 10000.0}}, "short_factor"),
        (
            {
                "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 7},
                "original_max_position_embeddings": 64,
            },
            "long_factor has 7 entries, expected 8",
        ),
        ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}},
         "original_max_position_embeddings"),
        ({"partial_rotary_factor": 0}, "partial_rotary_factor"),
        ({"partial_rotary_factor": 0.1}, "partial_rotary_factor"),  # 1.6 of head_dim 16: odd
        ({"rope_scaling": {"rope_type": "linear"}}, "factor"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
        ({"rope_scaling": "linear"}, "rope_scaling"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": "x"}},
         "original_max_position_embeddings"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "false"}}, "truncate"),
        ({"rope_theta": "10000"}, "rope_theta"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"hidden_size": 64.0}, "hidden_size"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": True}, "num_hidden_layers"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"num_attention_heads": [6]}, "num_attention_heads"),
        ({"num_key_value_heads": 4}, "num_key_value_heads"),
        ({"intermediate_size": None}, "intermediate_size"),
        ({"head_dim": "16"}, "head_dim"),
        ({"head_dim": 15}, "head_dim"),
        ({"hidden_size": 100}, "hidden_size"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
        ({"rms_norm_eps": False}, "rms_norm_eps"),
        ({"max_position_embeddings": 1.5}, "max_position_embeddings"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings"),
        ({"attention_bias": "false"}, "attention_bias"),
        ({"mlp_bias": 0}, "mlp_bias"),
        ({"torch_dtype": "int8"}, "torch_dtype"),
        ({"dtype": "float64", "torch_dtype": None}, "dtype"),
        ({"sliding_window": "4096"}, "sliding_window"),
        ({"sliding_window": True}, "sliding_window"),
        ({"use_sliding_window": "true", "sliding_window": 8}, "use_sliding_window"),
        ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": "2"}, "max_window_layers"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["full_attention", "chunked_attention", "full_attention"]}, "layer_types"),
        ({"architectures": []}, "architectures"),
        ({"architectures": None}, "architectures"),
        ({"architectures": [""]}, "architectures"),
        ({"model_type": 7}, "model_type"),
        ({"quantization_config": "gptq"}, "quantization_config"),
    ],
)  # fmt: skip
def test_unsupported_values_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidConfig) as info:
        ModelConfig.from_hf(legacy(**overrides))
    assert field in str(info.value)


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads"])  # fmt: skip
def test_missing_required_field_is_named(field: str) -> None:
    cfg = legacy()
    del cfg[field]
    with pytest.raises(InvalidConfig, match=field):
        ModelConfig.from_hf(cfg)


def test_top_level_must_be_an_object() -> None:
    with pytest.raises(InvalidConfig, match="object"):
        ModelConfig.from_hf([1, 2])  # type: ignore[arg-type]


def test_architecture_argument_overrides_config() -> None:
    assert ModelConfig.from_hf(legacy(architectures=None), architecture="X").architecture == "X"


def test_frozen() -> None:
    cfg = ModelConfig.from_hf(legacy())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rope_scaling.factor = 2.0  # type: ignore[misc]
    assert isinstance(cfg.layer_sliding_windows, tuple)
    hash(cfg)  # frozen all the way down: usable as a key


def test_eos_list_becomes_tuple_and_quantization_method() -> None:
    cfg = ModelConfig.from_hf(
        legacy(eos_token_id=[1, 2], bos_token_id=0, quantization_config={"quant_method": "awq"})
    )
    assert cfg.eos_token_id == (1, 2) and cfg.bos_token_id == 0
    assert cfg.quantization_method == "awq"


def test_from_file(tmp_path: Path) -> None:
    hf = hf_config("mistral", sliding_window=8)
    data = hf.to_dict() | {"architectures": ["MistralForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = ModelConfig.from_file(tmp_path / "config.json")
    assert cfg.architecture == "MistralForCausalLM" and cfg.layer_sliding_windows == (8, 8)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidConfig, match="not valid JSON"):
        ModelConfig.from_file(tmp_path / "config.json")
    with pytest.raises(InvalidConfig, match="not found"):
        ModelConfig.from_file(tmp_path / "missing.json")


def test_yarn_truncate_flag() -> None:
    scaling = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "truncate": False,
    }
    cfg = ModelConfig.from_hf(legacy(rope_scaling=scaling))
    assert cfg.rope_scaling.truncate is False
    assert (
        ModelConfig.from_hf(legacy(rope_scaling={**scaling, "truncate": None})).rope_scaling.truncate is True
    )
