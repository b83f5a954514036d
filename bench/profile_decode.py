"""Profile one model's batch-1 decode step (the bench's item 3 call) with torch.profiler.

    python -m bench.profile_decode [--model smol|tiny] [--mode with_cache|paged] [--steps 20]
                                   [--context 512] [--threads 2] [--top 25] [--quantization int8|int4]

Loads the model as the bench does (float32, CPU, mmap; with --quantization, quantized at Load in the
default compute dtype, as item 13 does), fills the cache with `context - 1` tokens,
then times `steps` decode steps of the `context`-th token (rewinding the cache each time, so every
step attends over the same context) and prints:

- the step's median wall time (without the profiler);
- the top ops by self CPU time, per step (torch.profiler's key averages divided by the steps);
- a per-layer breakdown: each decoder layer's modules (norms, q/k/v, attention context, o_proj, MLP)
  timed with record_function ranges, averaged over layers and steps, and what the layers leave to
  the rest of the step (embedding, final norm, lm_head, argument checks, batch preparation).

The ranges add a few µs each, so the breakdown's sum is slightly above the plain step time.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from architectures.kv_cache import ContiguousContext
from architectures.paged import PagedContext
from registry import LoadOptions

from .common import time_calls
from .models import BENCH_KV, BLOCK_SIZE, load_ours, new_registry, smollm2, tiny


def _ranges(network: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """record_function ranges around every submodule of every decoder layer, named by role
    (`layer.self_attn.qkv_proj`), so the profiler sums each role over layers."""
    handles = []
    for name, module in network.model.layers.named_modules():
        if not name:
            continue
        role = "layer" + ("." + name.split(".", 1)[1] if "." in name else "")
        open_ranges: list[record_function] = []

        def pre(_m, _a, role=role, open_ranges=open_ranges):
            r = record_function(role)
            r.__enter__()
            open_ranges.append(r)

        def post(_m, _a, _o, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def _wrap_attend(cls: type) -> Callable[[], None]:
    """A `layer.self_attn.attend` range around the context's attend (K/V store + attention)."""
    original = cls.attend

    def attend(self, *args, **kwargs):
        with record_function("layer.self_attn.attend"):
            return original(self, *args, **kwargs)

    cls.attend = attend
    return lambda: setattr(cls, "attend", original)


def _decode_call(model, ids: torch.Tensor, mode: str) -> Callable[[], object]:
    """Fill the cache with ids[:, :-1] and return the decode step of the last token."""
    ctx = ids.shape[1]
    model.reset_kv_cache()
    step = ids[:, ctx - 1 :]
    if mode == "with_cache":
        model.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
        return lambda: model.forward_with_cache(step, ctx - 1, 1, all_logits=False)
    table = list(range(-(-ctx // BLOCK_SIZE)))
    index = torch.arange(ctx - 1)
    blocks = torch.tensor(table, dtype=torch.long)
    slots = blocks[index // BLOCK_SIZE] * BLOCK_SIZE + index % BLOCK_SIZE
    model.forward_paged(ids[0, : ctx - 1], index, [table], slots, [ctx - 1], True)
    last = torch.tensor([ctx - 1])
    slot = torch.tensor([table[(ctx - 1) // BLOCK_SIZE] * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE])
    return lambda: model.forward_paged(step[0], last, [table], slot, [ctx], False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("smol", "tiny"), default="smol")
    parser.add_argument("--mode", choices=("with_cache", "paged"), default="with_cache")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--quantization", choices=("int8", "int4"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        bench_model = smollm2() if args.model == "smol" else tiny(Path(tmp))
        registry = new_registry([bench_model.root])
        if args.quantization:
            options = LoadOptions(device="cpu", quantization=args.quantization, kv_cache=BENCH_KV)
            registry.load_model_auto("profiled", bench_model.path, False, options)
            model = registry.get_model("profiled")
        else:
            model = load_ours(registry, "profiled", bench_model, BENCH_KV)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (1, args.context), generator=torch.Generator().manual_seed(0))
        call = _decode_call(model, ids, args.mode)
        for _ in range(3):
            call()
        plain = time_calls(call, args.steps).median * 1e3

        network = model.network
        layers = len(network.model.layers)
        handles = _ranges(network)
        restore = _wrap_attend(ContiguousContext if args.mode == "with_cache" else PagedContext)
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    with record_function("step"):
                        call()
        finally:
            restore()
            for h in handles:
                h.remove()

    events = prof.key_averages()
    print(
        f"{bench_model.label}{f' {args.quantization}' if args.quantization else ''}, {args.mode}, "
        f"context {args.context}, {args.threads} threads: "
        f"step {plain:.3f} ms (median of {args.steps}, no profiler)"
    )
    print(f"\nTop ops by self CPU time, µs per step ({args.steps} steps):")
    ops = [e for e in events if not e.key.startswith("layer") and e.key != "step"]
    ops.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"{'op':<44}{'self µs':>10}{'calls':>8}")
    for e in ops[: args.top]:
        print(f"{e.key[:43]:<44}{e.self_cpu_time_total / args.steps:>10.1f}{e.count / args.steps:>8.1f}")

    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.key.startswith("layer") or e.key == "step":
            totals[e.key] += e.cpu_time_total / args.steps
    step_us = totals.pop("step")
    layer_us = totals.get("layer", 0.0)
    print(f"\nPer decoder layer ({layers} layers), µs per layer per step (inclusive):")
    for key in sorted(totals):
        print(f"  {key:<40}{totals[key] / layers:>10.1f}")
    print(
        f"\nStep {step_us:.0f} µs under the profiler: layers {layer_us:.0f} µs, "
        f"the rest (embedding, final norm, lm_head, checks, batch preparation) {step_us - layer_us:.0f} µs"
    )


if __name__ == "__main__":
    main()
