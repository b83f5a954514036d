"""An independent reference for a Load quantized at load time over tensor-parallel ranks: a dense
float32 checkpoint whose linear weights are what the ranks hold after quantizing, dequantized.

Column-parallel projections (q/k/v, gate/up) are cut into whole output rows, which quantize exactly
as the whole tensor does (per-row int8 scales; int4 groups along the unchanged input size). The
row-parallel ones (o_proj, down_proj) are cut into runs of input columns, and each rank quantizes its
run on its own (its own int8 row scales, int4 groups for its input size), so the reference quantizes
each run separately and lays the dequantized runs side by side."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from registry.parallel import attention_shard, even_range
from registry.quantization.formats import quantize_dense
from registry.quantization.scheme import QuantScheme

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def dequantized_tp_checkpoint(model_dir: Path, out_dir: Path, method: str, world: int) -> Path:
    cfg = json.loads((model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    o_cols = []
    for r in range(world):
        s = attention_shard(heads, kv, world, r)
        o_cols.append((s.q_start * head_dim, s.num_heads * head_dim))
    down_cols = [
        (a, b - a) for a, b in (even_range(cfg["intermediate_size"], world, r) for r in range(world))
    ]
    scheme = QuantScheme(
        method, "dense", 4 if method == "int4" else 8
    )  # quantize_dense: int8, int4, else fp8

    def roundtrip(w: torch.Tensor) -> torch.Tensor:
        return quantize_dense(scheme, w).dequantize()

    tensors = load_file(model_dir / "model.safetensors")
    for name, w in tensors.items():
        layer = name.removesuffix(".weight").rpartition(".")[2]
        if not name.endswith(".weight") or w.dim() != 2:
            continue
        if layer in COLUMN_PARALLEL:
            tensors[name] = roundtrip(w).to(w.dtype)
        elif layer in ROW_PARALLEL:
            cols = o_cols if layer == "o_proj" else down_cols
            tensors[name] = torch.cat([roundtrip(w[:, a : a + n]) for a, n in cols], dim=1).to(w.dtype)
    out_dir.mkdir(parents=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(model_dir / "config.json", out_dir / "config.json")
    return out_dir
