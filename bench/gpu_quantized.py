"""The quantized-kernel rows of `make gpu-check` (bench/gpu_check.py calls `report`): the 1B-class
random Llama's linear layers quantized on the device (int8 per channel, int4 groups of 128, fp8 per
channel), the kernel each layer got (architectures/quantized_kernels.py), resident weight bytes, the
decode step at batch 1/16 against bfloat16, and max |logit difference| / max |logit| against the
bfloat16 model. It runs on any device (the tests run it on CPU with a tiny shape)."""

from __future__ import annotations

import math
import traceback
from collections import Counter

import torch
from torch import nn

METHODS = ("int8", "int4", "fp8")


def quantize_network(network: nn.Module, method: str, dtype: torch.dtype) -> nn.Module:
    """Replace every decoder linear layer (not lm_head, not embeddings) with its quantized layer."""
    from architectures.quantized_linear import make_quantized_linear
    from registry.quantization.formats import int4_group_size, quantize_fp8, quantize_int4, quantize_int8

    for name, module in list(network.named_modules()):
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        w = module.weight.detach().float()
        if method == "int8":
            q = quantize_int8(w)
        elif method == "int4":
            q = quantize_int4(w, int4_group_size(w.shape[1]))
        else:
            q = quantize_fp8(w)
        layer = make_quantized_linear(
            q, w.device, dtype, module.bias is not None, getattr(module, "shard_sizes", None)
        )
        if module.bias is not None:
            layer.bias = module.bias
        parent, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent) if parent else network, child, layer)
    return network


def _logits(model, context: int) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    return model.forward(ids.to(model.device)).float()


def report(
    device: torch.device,
    network_for,
    shape: dict,
    batch_sizes: tuple[int, ...] = (1, 16),
    *,
    context: int = 512,
    block_size: int = 16,
    iters: int = 20,
    methods: tuple[str, ...] = METHODS,
) -> tuple[str, bool]:
    """Markdown rows and whether any failed. `network_for(dtype)` builds a fresh random network."""
    from architectures.quantized_linear import QuantizedLinear, resident_totals

    from .gpu_check import decode_ms, wrap_model

    dtype = torch.bfloat16
    per_seq = math.ceil((context + 1) / block_size)
    blocks = per_seq * max(batch_sizes)
    head = " | ".join(f"b{b} ms" for b in batch_sizes)
    lines = [
        f"| quantized decode, bf16 activations | kernels | weight MB | {head} | vs bf16 (b1) | max logit diff / max |",
        "|---|---|---|" + "---|" * len(batch_sizes) + "---|---|",
    ]
    failed = False
    base_ms = reference = None
    for method in ("bfloat16", *methods):
        try:
            network = network_for(dtype)
            if method != "bfloat16":
                quantize_network(network, method, dtype)
            model = wrap_model(network, shape, device, dtype, "torch", blocks, block_size)
            kernels = Counter(m.kernel for m in network.modules() if isinstance(m, QuantizedLinear))
            with torch.inference_mode():
                logits = _logits(model, min(context, 64))
                ms = [decode_ms(model, b, context, iters) for b in batch_sizes]
            if reference is None:
                reference, base_ms = logits, ms[0]
            diff = float((logits - reference).abs().max()) / max(float(reference.abs().max()), 1e-12)
            mb = resident_totals(network)[0] / 1e6
            names = ", ".join(f"{k} ×{n}" for k, n in sorted(kernels.items())) or "dense"
            times = " | ".join(f"{t:.2f}" for t in ms)
            lines.append(f"| {method} | {names} | {mb:.1f} | {times} | {ms[0] / base_ms:.2f}× | {diff:.2e} |")
            del model, network
        except Exception as exc:  # keep the other rows; the traceback goes to stderr
            traceback.print_exc()
            failed = True
            lines.append(f"| {method} | failed: {type(exc).__name__}: {str(exc)[:160]} |" + " |" * 4)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(lines), failed
