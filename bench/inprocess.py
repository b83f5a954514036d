"""Items 2, 3, 4 and 6: our forward passes against transformers in the same process, same threads,
float32, alternating call by call; and the decode step against the memory-bandwidth limit."""

from __future__ import annotations

from typing import Any

import torch

from registry import Model

from .common import Case, Goal, Row, Stats, alternate, ratio, time_calls
from .context import Bench
from .models import (
    BATCH,
    BATCH_CONTEXT,
    BLOCK_SIZE,
    DECODE_CONTEXT,
    PREFILL_LENGTHS,
    BenchModel,
    ReferenceDecoder,
)


def best_reference(stats: dict[str, Stats], names: list[str]) -> tuple[str, Stats]:
    """The fastest transformers attention implementation by median (the fair reference)."""
    name = min(names, key=lambda n: stats[n].median)
    return name, stats[name]


def reference_cell(name: str, s: Stats) -> str:
    return f"{s.fmt()} transformers {name}"


def prefill(b: Bench) -> None:
    """Item 2: stateless forward over a fresh prompt, last-token logits, batch 1."""
    for model in b.models:
        for n in PREFILL_LENGTHS if model is b.smol else PREFILL_LENGTHS[:1]:
            prefill_row(b, model, n)


def prefill_row(
    b: Bench, model: BenchModel, n: int, *, item: int = 2, key: str = "", max_reps: int = 30
) -> None:
    """A prefill row of `model` (loaded in b.ours, references in b.refs) against transformers."""
    ours = b.ours[model.label]
    refs = b.refs[model.label]
    ids = b.tokens(model, 1, n)
    cases = [Case("ours", lambda: ours.forward(ids, all_logits=False))]
    for attn, hf in refs.items():
        cases.append(Case(attn, lambda hf=hf: _reference_prefill(hf, ids)))
    stats = alternate(cases, b.budget(12.0 if n > 128 else 6.0), min_reps=3, max_reps=max_reps)
    name, ref = best_reference(stats, list(refs))
    b.report.add(
        Row(
            f"{item}. Prefill {n} tokens, {model.label}",
            stats["ours"].fmt(),
            reference_cell(name, ref),
            ratio(stats["ours"], ref),
            Goal(1.0),
            key=key or f"prefill-{n}-{model.label}",
            spread=(stats["ours"], ref),
        )
    )


@torch.inference_mode()
def _reference_prefill(hf: Any, ids: torch.Tensor) -> torch.Tensor:
    # Stateless like ours: no cache built, only the last position's logits computed.
    return hf(ids, use_cache=False, logits_to_keep=1).logits


def paged_prefill(ours: Model, ids: torch.Tensor, table: list[int]) -> None:
    """Write ids [n] as one sequence into the paged cache at the blocks of `table`."""
    n = ids.shape[0]
    index = torch.arange(n)
    blocks = torch.tensor(table, dtype=torch.long)
    slots = blocks[index // BLOCK_SIZE] * BLOCK_SIZE + index % BLOCK_SIZE
    ours.forward_paged(ids, index, [table], slots, [n], True)


def copy_blocks(ours: Model, src: list[int], dsts: list[list[int]]) -> None:
    """Copy the paged K/V of blocks `src` to each table in `dsts`, in every layer."""
    index = torch.tensor(src)
    for layer_k, layer_v in zip(ours.paged.k, ours.paged.v, strict=True):
        for table in dsts:
            dst = torch.tensor(table)
            layer_k[dst] = layer_k[index]
            layer_v[dst] = layer_v[index]


def decode(b: Bench) -> None:
    """Item 3: one decode step at context 512, batch 1: forward_with_cache and forward_paged against
    transformers with its DynamicCache (rewound untimed after each step, so the context stays 512)."""
    for model in b.models:
        _decode(b, model)


def _decode(b: Bench, model: BenchModel) -> None:
    ctx = DECODE_CONTEXT
    ours = b.ours[model.label]
    ids = b.tokens(model, 1, ctx)
    ours.reset_kv_cache()
    ours.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
    table = list(range(ctx // BLOCK_SIZE))  # blocks [0, 32): the first NUM_BLOCKS share
    paged_prefill(ours, ids[0, : ctx - 1], table)
    step = ids[:, ctx - 1 :]
    last = torch.tensor([ctx - 1])
    slot = torch.tensor([table[(ctx - 1) // BLOCK_SIZE] * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE])

    compiled = b.compiled_model(model)
    compiled.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
    cases = [
        Case("with_cache", lambda: ours.forward_with_cache(step, ctx - 1, 1, all_logits=False)),
        Case("compiled", lambda: compiled.forward_with_cache(step, ctx - 1, 1, all_logits=False)),
        Case("paged", lambda: ours.forward_paged(step[0], last, [table], slot, [ctx], False)),
    ]
    decoders = {attn: ReferenceDecoder(hf, ids[:, : ctx - 1]) for attn, hf in b.refs[model.label].items()}
    for attn, dec in decoders.items():
        cases.append(Case(attn, lambda dec=dec: dec.step(step), prepare=dec.rewind))
    stats = alternate(cases, b.budget(8.0), min_reps=5, max_reps=200, warmup=2)
    name, ref = best_reference(stats, list(decoders))
    labels = (
        ("with_cache", "forward_with_cache"),
        (
            "compiled",
            f"forward_with_cache compiled (compile_decode, {compiled.compile_seconds:.1f} s at Load)",
        ),
        ("paged", "forward_paged"),
    )
    for kind, label in labels:
        b.report.add(
            Row(
                f"3. Decode step, context {ctx}, {label}, {model.label}",
                stats[kind].fmt(),
                reference_cell(name, ref),
                ratio(stats[kind], ref),
                decode_goal(kind, model is b.smol),
                key=f"decode-{kind}-{model.label}",
                spread=(stats[kind], ref),
            )
        )
    b.figures[f"decode-with_cache-{model.label}"] = stats["with_cache"]
    b.figures[f"decode-paged-{model.label}"] = stats["paged"]
    b.figures[f"decode-compiled-{model.label}"] = stats["compiled"]
    if model is b.smol:
        b.gemv_floors[model.label] = gemv_floor(ours)
        for kind in ("with_cache", "compiled", "paged"):
            b.reasons[f"decode-{kind}-{model.label}"] = decode_reason(b, model, stats[kind], kind)
    b.figures[f"decode-ref-{model.label}"] = ref
    b.labels[f"decode-ref-{model.label}"] = f"transformers {name}"


def matmul_floor(
    model: Model, rows: int = 1, reps: int = 20, kernel: str | None = None
) -> tuple[float, int, int]:
    """(seconds, weight bytes, flops): every dense weight matrix of `model` applied to `rows` tokens
    back to back with the model's matmul kernel (or `kernel`), as a forward applies them (q/k/v and
    gate/up as the fused matrices they are) — the part no fusing of the rest can remove. With
    rows > 1 (a prefill) the lm_head is left out: it scores only the last token. The median of
    `reps` passes."""
    from architectures.cpu_gemm import gemm_for

    head = model.network.lm_head
    weights = [
        m.weight
        for m in model.network.modules()
        if isinstance(m, torch.nn.Linear) and not (rows > 1 and m is head)
    ]
    inputs = {w.shape[1]: torch.randn(1, rows, w.shape[1], dtype=w.dtype) for w in weights}
    calls = [(gemm_for(kernel or model.cpu_gemm, w), inputs[w.shape[1]], w) for w in weights]

    def one_pass() -> None:
        for gemm, x, w in calls:
            gemm(x, w)

    with torch.inference_mode():
        one_pass()
        seconds = time_calls(one_pass, reps).median
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    flops = sum(2 * rows * w.numel() for w in weights)
    return seconds, nbytes, flops


def gemv_floor(model: Model) -> tuple[float, int]:
    """(seconds, bytes) of a decode step's GEMVs alone (matmul_floor of one token)."""
    seconds, nbytes, _ = matmul_floor(model)
    return seconds, nbytes


def attention_floor(model: Model, tokens: int, reps: int = 3) -> float:
    """Seconds of a prefill's causal attention alone: SDPA over `tokens` for every layer, with the
    model's head counts and dtype (the same kernel the forward calls)."""
    import torch.nn.functional as F

    c = model.config
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, c.num_attention_heads, tokens, c.head_dim, generator=gen, dtype=model.dtype)
    k = torch.randn(1, c.num_key_value_heads, tokens, c.head_dim, generator=gen, dtype=model.dtype)
    gqa = c.num_attention_heads != c.num_key_value_heads

    def every_layer() -> None:
        for _ in range(c.num_hidden_layers):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=gqa)

    with torch.inference_mode():
        every_layer()
        return time_calls(every_layer, reps).median


def prefill_reason(model: Model, tokens: int, ours: Stats, theirs: Stats) -> str:
    """The measured split of a prefill: its GEMMs alone, its attention alone, and what is left."""
    seconds, _, flops = matmul_floor(model, tokens, reps=3)
    attention = attention_floor(model, tokens)
    goal = theirs.median / 2
    return (
        f"measured here: the prefill's GEMMs alone ({flops / 1e9:.0f} GFLOP over the weight matrices) take "
        f"{seconds * 1e3:.0f} ms ({flops / seconds / 1e9:.0f} GFLOP/s) and its causal attention alone "
        f"{attention * 1e3:.0f} ms of our {ours.median * 1e3:.0f} ms; half of llama.cpp's "
        f"{theirs.median * 1e3:.0f} ms is {goal * 1e3:.0f} ms, "
        + (
            "less than those two kernels take together"
            if seconds + attention > goal
            else f"which leaves {(goal - seconds - attention) * 1e3:.0f} ms for everything else"
        )
    )


def decode_reason(b: Bench, model: BenchModel, step: Stats, kind: str) -> str:
    """The measured split of a decode step: its GEMVs alone, and what the rest costs."""
    seconds, nbytes = b.gemv_floors[model.label]
    rest = step.median - seconds
    text = (
        f"measured here: the step's GEMVs alone (the {nbytes / 1e6:.0f} MB of weight matrices back to back) "
        f"take {seconds * 1e3:.1f} ms ({nbytes / seconds / 1e9:.1f} GB/s; memory read {b.bandwidth / 1e9:.1f} GB/s) "
        f"of the {step.median * 1e3:.1f} ms step, leaving {rest * 1e3:.1f} ms for attention over the context, "
        "norms, RoPE and per-op dispatch"
    )
    if kind == "with_cache":
        text += " (compile_decode fuses the latter: see its row)"
    return text


def decode_goal(kind: str, real_model: bool) -> Goal:
    """Issue 19's goals: forward_with_cache 0.85×; forward_paged 0.9× for SmolLM2, and 1.0× for the
    tiny model, whose step is short enough that a paged call's fixed cost weighs."""
    if kind in ("with_cache", "compiled"):
        return Goal(0.85)
    return Goal(0.9) if real_model else Goal(1.0)


def batched_decode(b: Bench) -> None:
    """Item 4: 16 sequences at context 256 in one forward_paged decode step against transformers'
    batched decode; and tokens/s against our own batch-1 step at the same context."""
    model = b.smol
    ours = b.ours[model.label]
    ctx, per_seq = BATCH_CONTEXT, BATCH_CONTEXT // BLOCK_SIZE
    first = DECODE_CONTEXT // BLOCK_SIZE  # blocks after the ones item 3 used
    tables = [[first + s * per_seq + j for j in range(per_seq)] for s in range(BATCH)]
    prefix = b.tokens(model, 1, ctx - 1)
    # Every row holds the same prefix: prefill one sequence, copy its blocks to the others. The
    # timed step reads as many keys as 16 separate prefills would leave, at a 16th of the set-up cost.
    paged_prefill(ours, prefix[0], tables[0])
    copy_blocks(ours, tables[0], tables[1:])
    tokens = b.tokens(model, BATCH)
    positions = torch.full((BATCH,), ctx - 1, dtype=torch.long)
    slots = torch.tensor([t[(ctx - 1) // BLOCK_SIZE] * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE for t in tables])
    lens = [ctx] * BATCH

    cases = [
        Case("batch", lambda: ours.forward_paged(tokens, positions, tables, slots, lens, False)),
        Case(
            "single",
            lambda: ours.forward_paged(tokens[:1], positions[:1], tables[:1], slots[:1], [ctx], False),
        ),
    ]
    decoders = {attn: ReferenceDecoder(hf, prefix, repeat=BATCH) for attn, hf in b.refs[model.label].items()}
    for attn, dec in decoders.items():
        cases.append(Case(attn, lambda dec=dec: dec.step(tokens.view(BATCH, 1)), prepare=dec.rewind))
    stats = alternate(cases, b.budget(10.0), min_reps=3, max_reps=100, warmup=2)
    name, ref = best_reference(stats, list(decoders))
    batch, single = stats["batch"], stats["single"]
    b.report.add(
        Row(
            f"4. Batched decode step, {BATCH} × context {ctx}, forward_paged, {model.label}",
            batch.fmt(),
            reference_cell(name, ref),
            ratio(batch, ref),
            Goal(1.0),
            key="batched-step",
            spread=(batch, ref),
        )
    )
    batch_tps, single_tps = BATCH / batch.median, 1 / single.median
    b.report.add(
        Row(
            f"4. Batched decode tokens/s, {BATCH} × context {ctx} vs our batch 1, {model.label}",
            f"{batch_tps:.1f} tok/s",
            f"{single_tps:.1f} tok/s (batch 1: {single.fmt()})",
            batch_tps / single_tps,
            Goal(6.0, at_least=True),
            key="batched-speedup",
            spread=(batch, single),
        )
    )


def roofline(b: Bench) -> None:
    """Item 6: a batch-1 decode step must read every weight once; at the measured read bandwidth
    that takes (weights + the KV it attends over) / bandwidth. Reported as a fraction of that limit."""
    model = b.smol
    ours = b.ours[model.label]
    c = ours.config
    kv_bytes = DECODE_CONTEXT * 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4
    need = ours.weight_bytes + kv_bytes
    limit = need / b.bandwidth
    limit_text = f"limit {limit * 1e3:.1f} ms = {need / 1e6:.0f} MB ÷ {b.bandwidth / 1e9:.1f} GB/s"
    for key, label in (
        (f"decode-with_cache-{model.label}", "ours forward_with_cache"),
        (f"decode-compiled-{model.label}", "ours forward_with_cache compiled"),
        (f"decode-paged-{model.label}", "ours forward_paged"),
        (f"decode-ref-{model.label}", b.labels[f"decode-ref-{model.label}"]),
    ):
        step = b.figures[key]
        b.report.add(
            Row(
                f"6. Roofline: decode step at context {DECODE_CONTEXT}, {label}, {model.label}",
                f"{step.fmt()}: {limit / step.median:.0%} of the limit",
                limit_text,
                step.median / limit,
                "report",
                key=f"roofline-{label}",
            )
        )


def reference_models(b: Bench, model: BenchModel) -> dict[str, Any]:
    from .models import load_reference

    return {attn: load_reference(model, attn) for attn in ("eager", "sdpa")}
