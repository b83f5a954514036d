"""ModelConfig.raw and the typed accessors architectures use for their own config.json fields."""

from __future__ import annotations

from typing import Any

import pytest

from registry import InvalidConfig, ModelConfig

BASE: dict[str, Any] = {
    "architectures": ["ToyMoeForCausalLM"],
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def config(**extra: Any) -> ModelConfig:
    return ModelConfig.from_hf({**BASE, **extra})


def test_raw_keeps_every_field_read_only() -> None:
    c = config(num_experts=8, router_aux_loss_coef=0.001, custom={"a": 1})
    assert c.raw["num_experts"] == 8 and c.raw["custom"] == {"a": 1}
    with pytest.raises(TypeError):
        c.raw["num_experts"] = 4  # type: ignore[index]
    assert c == config(num_experts=9, router_aux_loss_coef=0.001, custom={"a": 1})  # raw is not compared


def test_accessors_read_defaults_and_nulls() -> None:
    c = config(num_experts=8, norm_topk_prob=True, final_logit_softcapping=30.0, mlp_only_layers=[0], x=None)
    assert c.get_int("num_experts", minimum=1) == 8
    assert c.get_int("num_shared", 0) == 0 and c.get_int("x", 3) == 3  # absent, null → default
    assert c.get_bool("norm_topk_prob", False) is True
    assert c.get_float("final_logit_softcapping") == 30.0
    assert c.get_optional_float("final_logit_softcapping") == 30.0
    assert c.get_optional_float("attn_logit_softcapping") is None
    assert c.get_int_list("mlp_only_layers", ()) == (0,)
    assert (
        c.get_str("hidden_activation", "gelu_pytorch_tanh", choices=("gelu_pytorch_tanh",))
        == "gelu_pytorch_tanh"
    )


@pytest.mark.parametrize(
    ("extra", "read", "message"),
    [
        ({}, lambda c: c.get_int("num_experts"), "required field 'num_experts' is missing"),
        (
            {"num_experts": 0},
            lambda c: c.get_int("num_experts", minimum=1),
            "num_experts must be an integer >= 1, got 0",
        ),
        (
            {"num_experts": True},
            lambda c: c.get_int("num_experts"),
            "num_experts must be an integer, got True",
        ),
        ({"num_experts": "8"}, lambda c: c.get_int("num_experts"), "num_experts must be an integer, got '8'"),
        (
            {"norm_topk_prob": "yes"},
            lambda c: c.get_bool("norm_topk_prob", False),
            "norm_topk_prob must be true or false",
        ),
        (
            {"softcap": -1},
            lambda c: c.get_float("softcap", positive=True),
            "softcap must be a positive number, got -1",
        ),
        ({"softcap": "x"}, lambda c: c.get_optional_float("softcap"), "softcap must be a number, got 'x'"),
        (
            {"mlp_only_layers": [1.5]},
            lambda c: c.get_int_list("mlp_only_layers", ()),
            "mlp_only_layers must be a list",
        ),
        (
            {"act": "tanh"},
            lambda c: c.get_str("act", choices=("gelu",)),
            "act must be a string (one of gelu)",
        ),
    ],
)
def test_bad_fields_name_the_key(extra: dict[str, Any], read: Any, message: str) -> None:
    with pytest.raises(InvalidConfig, match="config.json: ") as err:
        read(config(**extra))
    assert message in str(err.value)
