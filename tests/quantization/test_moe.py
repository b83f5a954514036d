"""Quantized MoE experts stay quantized: a tiny Qwen3-MoE whose experts (and attention projections) are
stored as GPTQ 4-bit, and a Mixtral quantized to int8 / int4 while loading. Logits equal transformers
(float32) holding the dequantized weights within 1e-3 × max|logit|, through forward and forward_paged;
weight_bytes counts the packed experts."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import architectures
from architectures.moe import SparseMoeBlock
from architectures.quantized_experts import QuantizedExperts
from architectures.quantized_linear import QuantizedLinear
from registry import KvCacheOptions, LoadOptions, ModelRegistry
from tests.architectures.test_new_architectures import paged_script

from . import checkpoints as ck

transformers = pytest.importorskip("transformers")

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
QWEN3_MOE = dict(
    num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True
)
MIXTRAL = dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32)
EXPERT_PARTS = {
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("mlp", "w1", "w3", "w2"),
}


def _reference(arch: str, seed: int) -> torch.nn.Module:
    if arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**BASE, **QWEN3_MOE)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.MixtralConfig(**BASE, **MIXTRAL)
        model = transformers.MixtralForCausalLM(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _per_expert(arch: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' stacked experts → the per-expert tensors checkpoints hold."""
    _, gate, up, down = EXPERT_PARTS[arch]
    out = {}
    for name, value in state.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            inter = value.shape[1] // 2
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{gate}.weight"] = value[e, :inter]
                out[f"{prefix}.{e}.{up}.weight"] = value[e, inter:]
        elif leaf == "down_proj":
            for e in range(value.shape[0]):
                out[f"{prefix}.{e}.{down}.weight"] = value[e]
        else:
            out[name] = value
    if arch == "mixtral":  # transformers 5 names it `mlp` in memory; Mixtral checkpoints, block_sparse_moe
        out = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in out.items()}
    return {k: v.detach().contiguous() for k, v in out.items()}


def _save(model: torch.nn.Module, tensors: dict[str, torch.Tensor], out: Path, quant: dict | None) -> Path:
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    if quant is not None:
        config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(config))
    return out


def _load(model_dir: Path, quantization: str = "", dtype=torch.float32):
    reg = ModelRegistry(device="cpu", model_roots=[model_dir.parent])
    architectures.register_builtin(reg)
    options = LoadOptions(
        dtype=dtype, quantization=quantization, kv_cache=KvCacheOptions(block_size=4, num_blocks=48)
    )
    return reg.load(model_dir.name, model_dir, options=options).entry.model


def _dequantized_reference(ref: torch.nn.Module, model) -> torch.nn.Module:
    """transformers' model holding exactly the weights our quantized layers apply (float32)."""
    state = {}
    for name, module in model.network.named_modules():
        if isinstance(module, QuantizedExperts):
            state[f"{name}.gate_up_proj"] = torch.stack([m.dequantize(torch.float32) for m in module.gate_up])
            state[f"{name}.down_proj"] = torch.stack([m.dequantize(torch.float32) for m in module.down])
        elif isinstance(module, QuantizedLinear) and ".experts." not in name:
            w = module.dequantize(torch.float32)
            if name.endswith("qkv_proj"):
                q, k, v = w.split(module.shard_sizes)
                base = name.removesuffix("qkv_proj")
                state.update(
                    {f"{base}q_proj.weight": q, f"{base}k_proj.weight": k, f"{base}v_proj.weight": v}
                )
            elif name.endswith("gate_up_proj"):
                g, u = w.split(module.shard_sizes)
                base = name.removesuffix("gate_up_proj")
                state.update({f"{base}gate_proj.weight": g, f"{base}up_proj.weight": u})
            else:
                state[f"{name}.weight"] = w
    state = {k.replace("block_sparse_moe", "mlp"): v for k, v in state.items()}
    missing = set(state) - set(ref.state_dict())
    assert not missing, missing
    with torch.no_grad():
        ref.load_state_dict(state, strict=False)
    return ref


def _check(model, ref: torch.nn.Module) -> None:
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = model.forward(ids).float()
    assert float((got - expected).abs().max()) <= 1e-3 * float(expected.abs().max())
    err = paged_script(model, 3, prompts=(6, 11, 9), shared_blocks=2)
    bad = {k: e for k, e in err.items() if not e <= 1e-4}
    assert not bad, f"forward_paged differs from forward: {bad}"
    experts = [m for m in model.network.modules() if isinstance(m, QuantizedExperts)]
    assert len(experts) == 2
    assert not any(isinstance(p, torch.nn.Parameter) and p.dim() == 3 for p in model.network.parameters())


def test_gptq_experts_stay_quantized(tmp_path: Path) -> None:
    ref = _reference("qwen3_moe", seed=1)
    layer = ck.gptq_layer(4, 32, False, True)
    tensors = {}
    for name, value in _per_expert("qwen3_moe", ref.state_dict()).items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module.rsplit(".", 1)[-1] in ck.LINEARS:
            # Projections of one input share GPTQ's act-order permutation (as write_checkpoint does).
            key = (
                module.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            )
            gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
            packed, _ = layer(value.float(), gen)
            tensors.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
        else:
            tensors[name] = value
    model_dir = _save(ref, tensors, tmp_path / "qwen3-moe-gptq", ck.gptq_config(4, 32, False, True))
    model = _load(model_dir)
    assert model.quantization == "gptq-int4-g32-act-asym"
    _check(model, _dequantized_reference(ref, model))
    dense = _load(_save(ref, _per_expert("qwen3_moe", ref.state_dict()), tmp_path / "dense", None))
    assert model.weight_bytes < 0.45 * dense.weight_bytes  # 4-bit codes + scales, not float32 experts


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_mixtral_quantized_while_loading(tmp_path: Path, quantization: str) -> None:
    ref = _reference("mixtral", seed=2)
    model_dir = _save(ref, _per_expert("mixtral", ref.state_dict()), tmp_path / "mixtral", None)
    model = _load(model_dir, quantization)
    assert model.quantization == quantization
    routers = [m.gate for m in model.network.modules() if isinstance(m, SparseMoeBlock)]
    assert routers and all(type(r) is torch.nn.Linear for r in routers)  # routers stay dense
    _check(model, _dequantized_reference(ref, model))
    dense = _load(model_dir)
    assert model.weight_bytes < 0.5 * dense.weight_bytes
