"""Item 10: a tiny mixture-of-experts model (Mixtral layout: 2 layers, hidden 64, 8 experts, top 2)
against transformers in the same process: stateless prefill of 128 tokens, and one decode step at
context 128 through forward_with_cache (transformers' DynamicCache rewound untimed after each step).
The MoE block groups tokens per expert on both sides, so the ratio is about the expert loop."""

from __future__ import annotations

from pathlib import Path

import torch

from .common import Case, Goal, Row, alternate, ratio
from .context import Bench
from .inprocess import best_reference, prefill_row, reference_cell
from .models import BENCH_KV, BenchModel, ReferenceDecoder, load_ours, load_reference, new_registry

MOE_PREFILL = 128
MOE_CONTEXT = 128


def tiny_moe(root: Path) -> BenchModel:
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    path = root / "tiny-moe"
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    return BenchModel("tiny MoE (Mixtral, 8 experts, top 2)", root, path)


def moe(b: Bench, root: Path) -> None:
    model = tiny_moe(root)
    ours = load_ours(new_registry([root]), "bench-tiny-moe", model, BENCH_KV)
    b.ours[model.label] = ours
    refs = {attn: load_reference(model, attn) for attn in ("eager", "sdpa")}
    b.refs[model.label] = refs
    prefill_row(b, model, MOE_PREFILL, item=12, key="prefill-moe", max_reps=50)
    ctx = MOE_CONTEXT
    ids = b.tokens(model, 1, ctx)
    ours.reset_kv_cache()
    ours.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
    step = ids[:, ctx - 1 :]
    cases = [Case("ours", lambda: ours.forward_with_cache(step, ctx - 1, 1, all_logits=False))]
    decoders = {attn: ReferenceDecoder(hf, ids[:, : ctx - 1]) for attn, hf in refs.items()}
    for attn, dec in decoders.items():
        cases.append(Case(attn, lambda dec=dec: dec.step(step), prepare=dec.rewind))
    stats = alternate(cases, b.budget(6.0), min_reps=5, max_reps=200, warmup=2)
    name, ref = best_reference(stats, list(decoders))
    b.report.add(
        Row(
            f"12. Decode step, context {ctx}, forward_with_cache, {model.label}",
            stats["ours"].fmt(),
            reference_cell(name, ref),
            ratio(stats["ours"], ref),
            Goal(1.0),
            key="decode-moe",
            spread=(stats["ours"], ref),
        )
    )
