"""Quantized checkpoints of a tiny random Llama, written the way each format's reference writer
does, plus the float32 weights they dequantize to (the reference the loaded model must match).

GPTQ and AWQ are packed here with loops transcribed from AutoGPTQ's `QuantLinear.pack` and
AutoAWQ's `WQLinear_GEMM.from_linear` (neither library installs without its own torch), element by
element and independent of the vectorised unpacking under test; compressed-tensors checkpoints are
compressed by the compressed-tensors library itself, and its `decompress` gives their reference.
FP8 block-wise follows DeepSeek-V3's layout (`weight_scale_inv` per [rows, cols] block).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.tiny_models import make_hf_model

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER_MAP = (0, 2, 4, 6, 1, 3, 5, 7)

# One layer's quantizer: dense weight [n, k] → (checkpoint tensors by suffix, dequantized weight).
LayerWriter = Callable[[torch.Tensor, torch.Generator], tuple[dict[str, torch.Tensor], torch.Tensor]]


def write_checkpoint(
    out_dir: Path,
    quant_config: dict,
    layer: LayerWriter,
    seed: int = 0,
    arch: str = "llama",
    lm_head: bool = False,
    **overrides,
) -> tuple[Path, torch.nn.Module]:
    """Tiny model (Llama unless `arch` says otherwise) with every decoder projection (and the output
    projection when `lm_head`) quantized by `layer`; returns (dir, reference model in float32 holding
    the dequantized weights)."""
    model = make_hf_model(arch, seed=seed, **overrides)
    quantized = LINEARS + (("lm_head",) if lm_head else ())
    tensors: dict[str, torch.Tensor] = {}
    reference = {}
    for name, value in model.state_dict().items():
        module, _, suffix = name.rpartition(".")
        if suffix == "weight" and module.rsplit(".", 1)[-1] in quantized:
            # Projections of one input share their random choices (GPTQ's act order comes from the
            # input's Hessian, so q/k/v share one permutation, and gate/up another).
            key = (
                module.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            )
            gen = torch.Generator().manual_seed(seed * 100_003 + zlib.crc32(key.encode()))
            packed, dequantized = layer(value.detach().float(), gen)
            tensors.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
            reference[name] = dequantized
        else:
            tensors[name] = value.detach().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quant_config
    (out_dir / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        model.load_state_dict(reference, strict=False)
    return out_dir, model


# -- GPTQ (AutoGPTQ / GPTQModel) ------------------------------------------------------------------


def gptq_layer(bits: int, group_size: int, sym: bool, desc_act: bool, v2: bool = False) -> LayerWriter:
    maxq = (1 << bits) - 1

    def write(w: torch.Tensor, gen: torch.Generator):
        n, k = w.shape
        gs = group_size if group_size > 0 else k
        groups = k // gs
        if desc_act:  # act order: column perm[j] is the j-th quantized, groups follow that order
            perm = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int64)
            g_idx[perm] = torch.arange(k) // gs
        else:
            g_idx = torch.arange(k) // gs
        scales = torch.empty(groups, n)
        zeros = torch.empty(groups, n)
        for g in range(groups):
            wg = w[:, g_idx == g]
            if sym:
                scales[g] = 2 * wg.abs().amax(1) / maxq
                zeros[g] = (maxq + 1) // 2
            else:
                lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
                scales[g] = (hi - lo) / maxq
                zeros[g] = torch.round(-lo / scales[g]).clamp(0 if v2 else 1, maxq)
        scales = scales.half()  # stored in float16; the reference uses the stored values
        s, z = scales.float()[g_idx].t(), zeros[g_idx].t()  # [n, k]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq).to(torch.int64)
        dequantized = (q - z) * s
        intweight = q.t().numpy().astype(np.uint32)  # [k, n]
        qweight = np.zeros((k * bits // 32, n), dtype=np.uint32)
        i = row = 0
        while row < qweight.shape[0]:
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        stored = zeros.numpy().astype(np.int64) - (0 if v2 else 1)
        stored = stored.astype(np.uint32)
        qzeros = np.zeros((groups, n * bits // 32), dtype=np.uint32)
        i = col = 0
        while col < qzeros.shape[1]:
            for j in range(i, i + 32 // bits):
                qzeros[:, col] |= stored[:, j] << (bits * (j - i))
            i += 32 // bits
            col += 1
        return {
            "qweight": torch.from_numpy(qweight.view(np.int32)),
            "qzeros": torch.from_numpy(qzeros.view(np.int32)),
            "scales": scales,
            "g_idx": g_idx.to(torch.int32),
        }, dequantized

    return write


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool, v2: bool = False) -> dict:
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "true_sequential": True,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }


# -- AWQ GEMM (AutoAWQ) ---------------------------------------------------------------------------


def awq_layer(group_size: int) -> LayerWriter:
    def write(w: torch.Tensor, gen: torch.Generator):
        n, k = w.shape
        wg = w.reshape(n, k // group_size, group_size)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half()
        s = scales.float()
        zeros = torch.round(-lo / s).clamp(0, 15)
        q = torch.clamp(torch.round(wg / s[..., None]) + zeros[..., None], 0, 15)
        dequantized = ((q - zeros[..., None]) * s[..., None]).reshape(n, k)
        intweight = q.reshape(n, k).t().to(torch.int32).numpy().astype(np.uint32)  # [k, n]
        izeros = zeros.t().to(torch.int32).numpy().astype(np.uint32)  # [groups, n]

        def pack(values: np.ndarray) -> torch.Tensor:
            out = np.zeros((values.shape[0], values.shape[1] // 8), dtype=np.uint32)
            for col in range(values.shape[1] // 8):
                for i in range(8):
                    out[:, col] |= values[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
            return torch.from_numpy(out.view(np.int32))

        return {
            "qweight": pack(intweight),
            "qzeros": pack(izeros),
            "scales": scales.t().contiguous(),
        }, dequantized

    return write


def awq_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True}


# -- compressed-tensors (the library) -------------------------------------------------------------


def ct_scheme(kind: str, **weights):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(type=kind, **weights))


def ct_layer(scheme) -> LayerWriter:
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams

    args = scheme.weights
    compressor = FloatQuantizationCompressor if args.type == "float" else PackedQuantizationCompressor

    def write(w: torch.Tensor, gen: torch.Generator):
        n, k = w.shape
        if args.strategy == "group":
            view = w.reshape(n, k // args.group_size, args.group_size)
        elif args.strategy == "channel":
            view = w.reshape(n, 1, k)
        else:
            view = w.reshape(1, 1, -1)
        scale, zero_point = calculate_qparams(view.amin(-1), view.amax(-1), args)
        if args.strategy == "tensor":
            scale, zero_point = scale.reshape(1), zero_point.reshape(1)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
        packed = compressor.compress(state, scheme)
        reference = compressor.decompress(dict(packed), scheme)["weight"].float()
        return packed, reference

    return write


def ct_config(scheme, fmt: str) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed", ignore=["lm_head"]
    )
    return config.model_dump(mode="json")


# -- FP8 block-wise (DeepSeek-V3, Qwen3-FP8) ------------------------------------------------------


def fp8_block_layer(block: tuple[int, int]) -> LayerWriter:
    def write(w: torch.Tensor, gen: torch.Generator):
        n, k = w.shape
        bn, bk = block
        rows, cols = -(-n // bn), -(-k // bk)
        scale_inv = torch.empty(rows, cols)
        codes = torch.empty(n, k, dtype=torch.float8_e4m3fn)
        dequantized = torch.empty(n, k)
        for r in range(rows):
            for c in range(cols):
                tile = w[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk]
                s = tile.abs().amax() / 448
                scale_inv[r, c] = s
                q = (tile / s).to(torch.float8_e4m3fn)
                codes[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk] = q
                dequantized[r * bn : (r + 1) * bn, c * bk : (c + 1) * bk] = q.float() * s
        return {"weight": codes, "weight_scale_inv": scale_inv}, dequantized

    return write


def fp8_block_config(block: tuple[int, int]) -> dict:
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
