"""Item 15 of `make bench`, and on its own: tensor parallelism on the CPU (gloo), SmolLM2 prefill and
decode step at TP=1 and TP=N, with the time rank 0 spends in collectives per decode step.

    python -m bench.tensor_parallel [--world 2] [--threads-total 2] [--rounds 20] [--prompt 128]
    python -m bench --items 15

TP=1 runs with `threads-total` torch threads; each of the N ranks with threads-total / N (as
`serve --tensor-parallel-size N` gives them). On its own it prints one markdown table; in the bench
it adds two rows (TP=N against TP=1 as the reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from .common import free_port


def _rank(rank: int, world: int, port: int, threads: int, model_dir: str, args: dict, out) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from architectures.backends import BACKENDS
    from architectures.base import build_causal_lm
    from architectures.llama import LlamaForCausalLM
    from registry import LoadOptions, ModelConfig
    from registry.load_plan import make_load_plan
    from registry.parallel import ParallelContext

    torch.set_num_threads(threads)
    parallel = ParallelContext()
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        parallel = ParallelContext(rank, world, None)
    path = Path(model_dir)
    config = ModelConfig.from_file(path / "config.json")
    options = LoadOptions(dtype=torch.float32)
    plan = make_load_plan(path, config.architecture, config, options, torch.device("cpu"), BACKENDS)
    model = build_causal_lm(
        path, torch.device("cpu"), options, LlamaForCausalLM, dataclasses.replace(plan, parallel=parallel)
    )
    ids = torch.randint(0, config.vocab_size, (1, args["prompt"]), generator=torch.Generator().manual_seed(0))
    prefill, decode, collectives = [], [], []
    with torch.inference_mode():
        for _ in range(args["rounds"]):
            started = time.perf_counter()
            model.forward_with_cache(ids, 0, ids.shape[1], all_logits=False)
            prefill.append(time.perf_counter() - started)
            before = parallel.collective_seconds
            started = time.perf_counter()
            model.forward_with_cache(ids[:, :1], ids.shape[1], 1, all_logits=False)
            decode.append(time.perf_counter() - started)
            collectives.append(parallel.collective_seconds - before)
    if rank == 0:
        out.put((statistics.median(prefill), statistics.median(decode), statistics.median(collectives)))
    if world > 1:
        dist.destroy_process_group()


def run_ranks(target, world: int, rank_args: tuple, timeout: float | None = None):  # noqa: ANN001, ANN201
    """Spawn `world` processes running `target(rank, world, port, *rank_args, out)` around a free
    loopback port; returns the one result rank 0 puts on `out`. Ranks still alive 30 s after it are
    killed."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, world, port, *rank_args, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)


def measure(world: int, threads: int, model_dir: Path, args: dict) -> tuple[float, float, float]:
    return run_ranks(_rank, world, (threads, str(model_dir), args))


def item(b, model_dir: Path, world: int = 2) -> None:  # noqa: ANN001 - bench.context.Bench
    """Item 15: TP=`world` (threads / world per rank) against TP=1 (all threads), prefill and decode."""
    args = {"rounds": 5 if b.quick else 20, "prompt": 128}
    threads = max(1, b.threads // world)
    one = measure(1, b.threads, model_dir, args)
    many = measure(world, threads, model_dir, args)
    for row in rows(one, many, world, threads, b.threads, args):
        b.report.add(row)


def rows(one: tuple, many: tuple, world: int, threads: int, total: int, args: dict) -> list:
    """Item 15's two rows from (prefill, decode, collectives) seconds at TP=1 and TP=`world`."""
    from .common import Row

    label = f"SmolLM2, TP={world} ({threads} thread/rank) vs TP=1 ({total} threads), gloo"
    why = "on the CPU tensor parallelism buys memory (each rank holds 1/N of the weights), not speed"
    out = []
    for i, what in enumerate((f"Prefill {args['prompt']}", f"Decode step, context {args['prompt']}")):
        extra = f"; collectives {many[2] * 1e3:.1f} ms of the step" if i == 1 else ""
        out.append(
            Row(
                f"15. {what}, {label}",
                f"{many[i] * 1e3:.1f} ms",
                f"TP=1: {one[i] * 1e3:.1f} ms",
                many[i] / one[i],
                None,
                note=f"median of {args['rounds']} rounds{extra}; {why}",
                key=f"tensor-parallel-{'prefill' if i == 0 else 'decode'}",
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tensor_parallel")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads-total", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=128)
    a = parser.parse_args(argv)
    from tests.real_model import smollm2_hf_dir

    model_dir = smollm2_hf_dir()
    args = {"rounds": a.rounds, "prompt": a.prompt}
    rows = []
    for world in (1, a.world):
        threads = max(1, a.threads_total // world)
        prefill, decode, coll = measure(world, threads, model_dir, args)
        rows.append((world, threads, prefill, decode, coll))
    print(f"SmolLM2-135M float32 on the CPU, prompt {a.prompt}, median of {a.rounds} rounds")
    print("| TP | threads/rank | prefill ms | decode step ms | collectives ms/decode step |")
    print("|---|---|---|---|---|")
    for world, threads, prefill, decode, coll in rows:
        print(f"| {world} | {threads} | {prefill * 1e3:.1f} | {decode * 1e3:.2f} | {coll * 1e3:.2f} |")


if __name__ == "__main__":
    main()
