"""Item 9: SmolLM2 quantized while loading (int8, int4; bfloat16 activations on CPU) against our
float32 model and transformers float32: the decode step at context 512, resident weight bytes, Load
time, and the step against the memory-bandwidth limit computed from the quantized bytes."""

from __future__ import annotations

import time

from registry import LoadOptions

from .common import Case, Goal, Row, alternate, ratio
from .context import Bench
from .inprocess import best_reference, reference_cell
from .models import BENCH_KV, DECODE_CONTEXT, ReferenceDecoder

GOALS = {"int8": 0.5, "int4": 0.35}  # step time ÷ transformers float32 (issue 15)


def quantized_decode(b: Bench) -> None:
    model = b.smol
    dense = b.ours[model.label]
    ctx = DECODE_CONTEXT
    ids = b.tokens(model, 1, ctx)
    step = ids[:, ctx - 1 :]
    loaded: dict[str, tuple[object, float]] = {}
    for q in GOALS:
        began = time.perf_counter()
        b.registry.load_model_auto(
            f"bench-{q}", model.path, False, LoadOptions(device="cpu", quantization=q, kv_cache=BENCH_KV)
        )
        loaded[q] = (b.registry.get_model(f"bench-{q}"), time.perf_counter() - began)
    try:
        for m in [dense] + [m for m, _ in loaded.values()]:
            m.reset_kv_cache()
            m.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
        cases = [Case("float32", lambda: dense.forward_with_cache(step, ctx - 1, 1, all_logits=False))]
        for q, (m, _) in loaded.items():
            cases.append(Case(q, lambda m=m: m.forward_with_cache(step, ctx - 1, 1, all_logits=False)))
        decoders = {attn: ReferenceDecoder(hf, ids[:, : ctx - 1]) for attn, hf in b.refs[model.label].items()}
        for attn, dec in decoders.items():
            cases.append(Case(attn, lambda dec=dec: dec.step(step), prepare=dec.rewind))
        stats = alternate(cases, b.budget(10.0), min_reps=5, max_reps=200, warmup=2)
        name, ref = best_reference(stats, list(decoders))
        c = dense.config
        for q, (m, load_s) in loaded.items():
            s = stats[q]
            b.report.add(
                Row(
                    f"13. Quantized decode step, context {ctx}, {q} (bfloat16 activations), {model.label}",
                    s.fmt(),
                    reference_cell(name, ref) + " float32",
                    ratio(s, ref),
                    Goal(GOALS[q]),
                    key=f"quant-decode-{q}",
                    spread=(s, ref),
                )
            )
            b.report.add(
                Row(
                    f"13. Quantized decode step vs our float32, {q}, {model.label}",
                    s.fmt(),
                    f"{stats['float32'].fmt()} ours float32",
                    ratio(s, stats["float32"]),
                    "report",
                    key=f"quant-vs-ours-{q}",
                )
            )
            b.report.add(
                Row(
                    f"13. Resident weight bytes and Load time, {q}, {model.label}",
                    f"{m.weight_bytes / 1e6:.0f} MB, Load {load_s:.2f} s",
                    f"{dense.weight_bytes / 1e6:.0f} MB ours float32",
                    m.weight_bytes / dense.weight_bytes,
                    "report",
                    key=f"quant-bytes-{q}",
                )
            )
            kv_bytes = ctx * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * m.dtype.itemsize
            need = m.weight_bytes + kv_bytes
            limit = need / b.bandwidth
            b.report.add(
                Row(
                    f"13. Roofline from the quantized bytes, {q}, {model.label}",
                    f"{s.fmt()}: {limit / s.median:.0%} of the limit",
                    f"limit {limit * 1e3:.1f} ms = {need / 1e6:.0f} MB ÷ {b.bandwidth / 1e9:.1f} GB/s",
                    s.median / limit,
                    "report",
                    key=f"quant-roofline-{q}",
                )
            )
    finally:
        for q in loaded:
            b.registry.unload_model(f"bench-{q}")
