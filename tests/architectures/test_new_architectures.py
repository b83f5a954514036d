"""Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral, Gemma 2, Gemma 3 (text) and Phi-3 against transformers
(fp32, max |Δ| ≤ 1e-4) through every path: `forward`, `forward_with_cache` (incremental, with a
rewind) and `forward_paged` (prefill, prefix-cached and chunked prefill, mixed, decode) on the torch
backend, on the flash_attn backend (its CPU stand-in, tests/architectures_paged/fake_flash_attn.py)
and on the triton backend (Triton interpreter; softcap and windows), each from the checkpoint transformers writes and from its 4.x-style config.json where that differs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import architectures
from architectures.backends.flash_backend import FlashAttnBackend
from registry import InvalidConfig, KvCacheOptions, LoadOptions, ModelRegistry, WeightsMismatch
from tests.architectures_paged import fake_flash_attn
from tests.architectures_paged.reference import Scheduler
from tests.tiny_models import save_hf_model
from tests.triton_interpreter import needs_interpreter

transformers = pytest.importorskip("transformers")

TOL = 1e-4
CPU = torch.device("cpu")
BASE: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
LONGROPE = dict(
    rope_type="longrope",
    rope_theta=500.0,
    short_factor=[1.0, 1.3, 1.9, 2.6],  # rotary dim 8 (half of head_dim 16): 4 frequencies
    long_factor=[1.5, 2.8, 4.1, 7.0],
    partial_rotary_factor=0.5,
    original_max_position_embeddings=32,
)


def _legacy_rope(raw: dict[str, Any]) -> None:
    """5.x rope_parameters → 4.x rope_theta (+ rope_scaling when not default)."""
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    if params.get("rope_type", "default") != "default":
        raw["rope_scaling"] = params


def legacy_qwen3_moe(raw: dict[str, Any]) -> None:
    raw["num_experts"] = raw.pop("num_local_experts")
    _legacy_rope(raw)


def legacy_gemma2(raw: dict[str, Any]) -> None:
    del raw["layer_types"]  # 4.x: every other layer from index 0 is windowed
    raw["hidden_act"] = "gelu"  # stale in 4.x checkpoints; hidden_activation wins
    _legacy_rope(raw)


def legacy_gemma3(raw: dict[str, Any]) -> None:
    del raw["layer_types"]
    raw["sliding_window_pattern"] = 3
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params["full_attention"]["rope_theta"]
    raw["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    scaling = {k: v for k, v in params["full_attention"].items() if k != "rope_theta"}
    raw["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in scaling.items()}


def legacy_phi3(raw: dict[str, Any]) -> None:
    params = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = params.pop("rope_theta")
    raw["partial_rotary_factor"] = params.pop("partial_rotary_factor")
    raw["original_max_position_embeddings"] = params.pop("original_max_position_embeddings")
    params.pop("rope_type")
    raw["rope_scaling"] = {"type": "su", **params}


@dataclass
class Arch:
    config: str
    model: str
    overrides: dict[str, Any]
    legacy: Callable[[dict[str, Any]], None] | None = None
    max_len: int = 40  # longest sequence the cache/paged checks build
    extra: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, Arch] = {
    "Qwen3ForCausalLM": Arch("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
    "Qwen3MoeForCausalLM": Arch(
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(MOE, num_experts=4, num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True, head_dim=16),
        legacy_qwen3_moe,
    ),
    "Qwen2MoeForCausalLM": Arch(
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(MOE, num_experts=5, decoder_sparse_step=1, shared_expert_intermediate_size=24),
    ),
    "MixtralForCausalLM": Arch(
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=6),
    ),
    "Gemma2ForCausalLM": Arch(
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=16,
            query_pre_attn_scalar=12,
            attn_logit_softcapping=0.7,  # small: it bends the random model's scores
            final_logit_softcapping=3.0,
            sliding_window=5,
            hidden_activation="gelu_pytorch_tanh",
        ),
        legacy_gemma2,
    ),
    "Gemma3ForCausalLM": Arch(
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            head_dim=16,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=20,
            sliding_window=5,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 40.0},
            },
        ),
        legacy_gemma3,
    ),
    "Phi3ForCausalLM": Arch(
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(hidden_size=64, rope_parameters=dict(LONGROPE), original_max_position_embeddings=32),
        legacy_phi3,
        max_len=30,  # under original_max_position_embeddings: one rope table across the calls
    ),
}


@dataclass
class Built:
    ref: torch.nn.Module
    model_dir: Path
    legacy_dir: Path | None


def make_reference(arch: Arch, seed: int) -> torch.nn.Module:
    config = getattr(transformers, arch.config)(**{**BASE, **arch.overrides})
    config._attn_implementation = "eager"  # softcapping needs the eager path in transformers
    torch.manual_seed(seed)
    model = getattr(transformers, arch.model)(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at 0 or 1 and routers near uniform: make all matter
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("new-archs")
    out = {}
    for i, (name, arch) in enumerate(ARCHS.items()):
        ref = make_reference(arch, seed=100 + i)
        model_dir = save_hf_model(ref, root / name)
        legacy_dir = None
        if arch.legacy is not None:
            legacy_dir = save_hf_model(ref, root / f"{name}-4x")
            raw = json.loads((legacy_dir / "config.json").read_text())
            arch.legacy(raw)
            (legacy_dir / "config.json").write_text(json.dumps(raw))
        out[name] = Built(ref, model_dir, legacy_dir)
    return out


def registry_for(root: Path) -> ModelRegistry:
    reg = ModelRegistry(device="cpu", model_roots=[root])
    architectures.register_builtin(reg)
    return reg


# bfloat16 paths against a bfloat16 dense forward: rounding of O(1) logits, not a wrong result.
BF16_TOL = 6e-2


def load(
    model_dir: Path,
    block_size: int = 4,
    num_blocks: int = 64,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    **kv: int,
):
    reg = registry_for(model_dir.parent)
    options = LoadOptions(
        dtype=dtype,
        attention_backend=backend,
        kv_cache=KvCacheOptions(block_size=block_size, num_blocks=num_blocks, **kv),
    )
    return reg.load(model_dir.name, model_dir, options=options).entry.model


def hf_logits(ref: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref(ids).logits.float()


NAMES = list(ARCHS)


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_transformers(built, name: str) -> None:
    b = built[name]
    dirs = [b.model_dir] + ([b.legacy_dir] if b.legacy_dir else [])
    ids = torch.randint(3, BASE["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(len(name)))
    want = hf_logits(b.ref, ids)
    for d in dirs:
        model = load(d)
        assert model.config.architecture == name
        err = float((model.forward(ids) - want).abs().max())
        assert err <= TOL, f"{d.name}: forward differs from transformers by {err}"


def test_phi3_long_factors_beyond_the_pretrained_length(built) -> None:
    """A call reaching past original_max_position_embeddings (32) uses the long factors."""
    b = built["Phi3ForCausalLM"]
    ids = torch.randint(3, BASE["vocab_size"], (1, 41), generator=torch.Generator().manual_seed(9))
    want = hf_logits(b.ref, ids)
    for d in (b.model_dir, b.legacy_dir):
        model = load(d)
        short = model.forward(ids[:, :20])
        assert float((short - hf_logits(b.ref, ids[:, :20])).abs().max()) <= TOL
        err = float((model.forward(ids) - want).abs().max())
        assert err <= TOL, f"{d.name}: {err}"
        # the long table differs from the short one: the first 20 rows change
        assert float((model.forward(ids)[:, :20] - short).abs().max()) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_forward_with_cache_incremental_with_rewind(built, name: str) -> None:
    b = built[name]
    model = load(b.model_dir, max_batch_size=2, max_seq_len=32)
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(3, BASE["vocab_size"], (2, 16), generator=gen)
    worst = 0.0

    def check(logits: torch.Tensor, seq: torch.Tensor) -> None:
        nonlocal worst
        want = hf_logits(b.ref, seq)[:, -logits.shape[1] :]
        worst = max(worst, float((logits - want).abs().max()))

    check(model.forward_with_cache(tokens[:, :7], 0, 7), tokens[:, :7])
    for pos in range(7, 12):  # decode one token at a time
        check(model.forward_with_cache(tokens[:, pos : pos + 1], pos, 1), tokens[:, : pos + 1])
    # rewind to position 5 with other tokens, then a 3-token chunk
    other = torch.randint(3, BASE["vocab_size"], (2, 4), generator=gen)
    seq = torch.cat([tokens[:, :5], other], dim=1)
    check(model.forward_with_cache(other[:, :1], 5, 1), seq[:, :6])
    check(model.forward_with_cache(other[:, 1:], 6, 3), seq)
    assert worst <= TOL, f"{name}: forward_with_cache differs from transformers by {worst}"


def paged_script(model, seed: int, prompts: tuple[int, int, int], shared_blocks: int) -> dict[str, float]:
    """Prefill, decode, prefix-cached + chunked prefill, mixed batches and decode after them, each
    against the model's own `forward` over every sequence's tokens (checked against transformers
    above). Sequence 3 shares the first `shared_blocks` blocks of sequence 2 (whose prompt is longer)."""
    sched = Scheduler(model, seed=seed)
    err = {
        "prefill (all rows)": sched.step([(0, prompts[0]), (1, prompts[1]), (2, prompts[2])], all_logits=True)
    }
    for i in range(2):
        err[f"decode {i}"] = sched.step([(0, 1), (1, 1), (2, 1)], is_prefill=False)
    sched.release(0)
    sched.fork(2, 3, blocks=shared_blocks)
    err["chunked + prefix-cached prefill"] = sched.step([(1, 4), (3, 5)])
    err["mixed (all rows)"] = sched.step([(2, 1), (4, 7), (1, 1), (3, 1)], all_logits=True)
    err["decode after mixed"] = sched.step([(1, 1), (2, 1), (3, 1), (4, 1)], is_prefill=False)
    return err


@pytest.mark.parametrize("name", NAMES)
def test_forward_paged_torch_backend(built, name: str) -> None:
    model = load(built[name].model_dir, block_size=4, num_blocks=48)
    assert model.attention_backend == "torch"
    err = paged_script(model, len(name), prompts=(6, 11, 9), shared_blocks=2)  # under 30 tokens each
    bad = {k: e for k, e in err.items() if not e <= TOL}
    assert not bad, f"{name}: forward_paged differs from forward: {bad}"


@pytest.fixture
def stand_in_flash(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)
    fake_flash_attn.calls.clear()
    return fake_flash_attn


# Not an MoE model: in bfloat16 a router's top-k can flip between two near-equal experts from rounding
# alone, which says nothing about the attention backend.
@pytest.mark.parametrize("name", ["Gemma2ForCausalLM", "Gemma3ForCausalLM"])
def test_forward_paged_flash_backend(built, stand_in_flash, name: str) -> None:
    """Softcap (Gemma 2), two RoPE bases with windows (Gemma 3) through
    the flash backend's calls (block size 256, as FlashAttention-2's paged cache requires), in
    bfloat16 as flash-attn demands, against the same model's dense bfloat16 forward."""
    model = load(built[name].model_dir, block_size=256, num_blocks=8, dtype=torch.bfloat16)
    model.backend = FlashAttnBackend()  # the stand-in runs on CPU; selection needs CUDA
    err = paged_script(model, 3, prompts=(20, 260, 270), shared_blocks=1)
    bad = {k: e for k, e in err.items() if not e <= BF16_TOL}
    assert not bad, f"{name}: forward_paged (flash_attn) differs from forward: {bad}"
    assert "varlen" in stand_in_flash.calls and "kvcache" in stand_in_flash.calls


@needs_interpreter
@pytest.mark.parametrize("name", ["Gemma2ForCausalLM"])
def test_forward_paged_triton_backend(built, name: str) -> None:
    """Softcap and windows (Gemma 2) through the triton kernels, run on the CPU under the Triton
    interpreter (slow: one architecture; the others add nothing backend-specific)."""
    model = load(built[name].model_dir, block_size=16, num_blocks=16, backend="triton")
    assert model.attention_backend == "triton"
    err = paged_script(model, 5, prompts=(6, 20, 18), shared_blocks=1)
    bad = {k: e for k, e in err.items() if not e <= TOL}
    assert not bad, f"{name}: forward_paged (triton) differs from forward: {bad}"


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("MixtralForCausalLM", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),
        ("Qwen2MoeForCausalLM", "model.layers.0.mlp.experts.4.down_proj.weight"),
    ],
)
def test_load_names_a_missing_expert_weight(built, tmp_path: Path, name: str, missing: str) -> None:
    """Strict loading: a checkpoint without one expert's tensor fails the Load naming that tensor as
    the checkpoint names it, and nothing stays registered."""
    src = built[name].model_dir
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    assert missing in tensors
    del tensors[missing]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    reg = registry_for(tmp_path)
    with pytest.raises(WeightsMismatch) as info:
        reg.load("broken", broken)
    assert f"missing 1 weight(s): {missing}" in str(info.value)
    assert reg.list_models() == []


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw.pop(key)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw.__setitem__(key, value)


def _short_long_factor(raw: dict[str, Any]) -> None:
    raw["rope_parameters"]["long_factor"] = [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        (
            "MixtralForCausalLM",
            _set("num_experts_per_tok", 5),
            "num_experts_per_tok (5) exceeds num_local_experts (4)",
        ),
        ("Qwen3MoeForCausalLM", _drop("moe_intermediate_size"), "'moe_intermediate_size' is missing"),
        ("Qwen2MoeForCausalLM", _set("norm_topk_prob", "yes"), "norm_topk_prob must be true or false"),
        ("Gemma3ForCausalLM", _set("use_bidirectional_attention", True), "use_bidirectional_attention"),
        (
            "Gemma2ForCausalLM",
            _set("attn_logit_softcapping", "50"),
            "attn_logit_softcapping must be a number",
        ),
        ("Phi3ForCausalLM", _short_long_factor, "long_factor has 3 entries, expected 4"),
    ],
    ids=[
        "mixtral-top-k",
        "qwen3-moe-intermediate",
        "qwen2-moe-norm",
        "gemma3-bidirectional",
        "gemma2-softcap",
        "phi3-factors",
    ],  # fmt: skip
)
def test_bad_config_fails_the_load_naming_the_field(
    built, tmp_path: Path, name: str, change: Callable[[dict[str, Any]], None], message: str
) -> None:
    src = built[name].model_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((src / "config.json").read_text())
    change(raw)
    (bad / "config.json").write_text(json.dumps(raw))
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    reg = registry_for(tmp_path)
    with pytest.raises(InvalidConfig) as info:
        reg.load("bad", bad)
    assert message in str(info.value)
    assert reg.list_models() == []
