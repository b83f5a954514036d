"""`import-gguf --keep-quant int4|int8`: which projections keep their llama.cpp blocks, and the
tensors written for them (registry/quantization/gguf_blocks.py has the layout).

Only block types that map onto our layers exactly are kept; nothing is quantized again:
- int4 keeps Q4_0, Q4_1 (4-bit codes, per-32 scales, Q4_1's offsets) and Q8_0 (8-bit codes);
- int8 keeps Q8_0 only; Q4_0/Q4_1 projections are dequantized (int4 keeps them).
Projections stored as F32/F16/BF16 stay dense, and so do the embeddings and norms. A projection of any
other block type (K-quants, Q5_*, IQ*) is an error: it cannot be kept exactly, and dequantizing it
silently would defeat the option. Projections our loader fuses (q/k/v, gate/up) are kept only together
and at one code width; otherwise the whole group is dequantized.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import numpy as np

from registry.quantization.gguf_blocks import GGUF_BITS, split_blocks

from .reader import GgufFile, GgufImportError
from .tensors import TensorPlan, unpermute_rotary

KEEP_QUANT_MODES = {"int4": ("Q4_0", "Q4_1", "Q8_0"), "int8": ("Q8_0",)}
DENSE_TYPES = ("F32", "F16", "BF16", "F64")
_PROJECTION = re.compile(r"(.*\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj|lm_head)\.weight")
_FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "gate": "gate_up", "up": "gate_up"}


def plan_kept(gf: GgufFile, plans: list[TensorPlan], mode: str) -> list[TensorPlan]:
    """`plans` with `keep` set on the projections that keep their blocks. Raises GgufImportError for
    an unknown mode, projections of block types that cannot be kept, or when nothing is kept."""
    if mode not in KEEP_QUANT_MODES:
        raise GgufImportError(
            f"--keep-quant {mode!r} is not supported (supported: {', '.join(KEEP_QUANT_MODES)})"
        )
    kept_types = KEEP_QUANT_MODES[mode]
    unsupported, groups = [], {}
    for i, plan in enumerate(plans):
        m = _PROJECTION.fullmatch(plan.hf_name)
        block_type = plan.source.type_name
        if m is None or block_type in DENSE_TYPES:
            continue
        if block_type not in GGUF_BITS:
            unsupported.append(f"{plan.source.name} ({block_type})")
            continue
        layer = m.group(1)
        group = f"{layer.rsplit('.', 1)[0]}.{_FUSED.get(m.group(2), m.group(2))}" if m.group(2) else layer
        groups.setdefault(group, []).append((i, block_type in kept_types, GGUF_BITS[block_type]))
    if unsupported:
        raise GgufImportError(
            f"{gf.path}: --keep-quant {mode} keeps only {', '.join(kept_types)} blocks exactly; these projections "
            f"are stored in other block types: {', '.join(unsupported)} (import without --keep-quant to "
            "dequantize them)"
        )
    out = list(plans)
    for members in groups.values():
        if all(keep for _, keep, _ in members) and len({bits for _, _, bits in members}) == 1:
            for i, _, _ in members:
                out[i] = replace(plans[i], keep=plans[i].source.type_name)
    if not any(p.keep for p in out):
        types = sorted({p.source.type_name for p in plans if _PROJECTION.fullmatch(p.hf_name)})
        raise GgufImportError(
            f"{gf.path}: --keep-quant {mode}: no projection is stored in {' or '.join(kept_types)} "
            f"(the projections are {', '.join(types)}); "
            + (
                "use --keep-quant int4"
                if mode == "int8" and set(types) & {"Q4_0", "Q4_1"}
                else "import without --keep-quant"
            )
        )
    return out


def kept_tensors(gf: GgufFile, plan: TensorPlan) -> dict[str, np.ndarray]:
    """The layer's codes / scales / mins, rows unpermuted like the dense weight would be."""
    n, k = plan.shape
    arrays = split_blocks(plan.keep, np.asarray(plan.source.raw.data), n, k)
    if plan.unpermute_heads:
        arrays = {s: unpermute_rotary(a, plan.unpermute_heads) for s, a in arrays.items()}
    return {s: np.ascontiguousarray(a) for s, a in arrays.items()}


def kept_shapes(plan: TensorPlan) -> dict[str, tuple[str, tuple[int, ...]]]:
    """suffix → (safetensors dtype, shape) of the tensors `kept_tensors` returns."""
    n, k = plan.shape
    out = {
        "gguf_codes": ("U8", (n, k * GGUF_BITS[plan.keep] // 8)),
        "gguf_scales": ("F16", (n, k // 32)),
    }
    if plan.keep == "Q4_1":
        out["gguf_mins"] = ("F16", (n, k // 32))
    return out


def quantization_config(plans: list[TensorPlan], mode: str) -> dict[str, Any]:
    return {
        "quant_method": "gguf",
        "keep_quant": mode,
        "group_size": 32,
        "tensor_types": {p.hf_name.removesuffix(".weight"): p.keep for p in plans if p.keep},
    }
