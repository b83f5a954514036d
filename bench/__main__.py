"""`make bench` (`python -m bench`): ours against transformers and the hardware limit, in one run.

Prints one markdown table (median and p10–p90 spread over alternating rounds; ratio = ours ÷
reference) and writes it to bench/results/<host>-<date>.md. `--quick` takes a short run (fewer
rounds, shorter windows; its file ends in -quick.md).
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from registry.cpu_gemm import calibrate_cpu_gemm

from . import inprocess, kv_transfer, llamacpp, moe, quantized, sampling, serving, tensor_parallel
from . import weights as weight_updates
from .common import (
    FRESH_PAGES_ENV,
    CpuSnapshot,
    GiB,
    Report,
    cpu_model,
    foreign_cpu_share,
    read_bandwidth,
    usable_cores,
)
from .context import Bench
from .models import (
    BENCH_KV,
    BenchModel,
    BenchSetupError,
    load_ours,
    load_reference,
    new_registry,
    quiet_transformers,
    smollm2,
    tiny,
)
from .reasons import REASONS

RESULTS = Path(__file__).resolve().parent / "results"
ITEMS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run: fewer rounds, same items")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads for both sides (default: torch's default)"
    )
    parser.add_argument(
        "--items", default="", help="comma-separated item numbers to run (default: all; 6 needs 3)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory of the result file")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def header(b: Bench, started: datetime) -> list[str]:
    import transformers

    smol = b.ours.get(b.smol.label)
    shape = (
        f"{smol.num_parameters / 1e6:.0f} M parameters, {smol.weight_bytes / 1e6:.0f} MB"
        if smol is not None
        else "not loaded"
    )
    return [
        f"# modelworker bench: {platform.node()}, {started:%Y-%m-%d %H:%M}",
        "",
        f"Command: `make bench` (`python -m bench{' --quick' if b.quick else ''}"
        f"{f' --threads {b.threads}' if b.threads != torch.get_num_threads() else ''}`).",
        f"Machine: {cpu_model()}, {usable_cores()} usable cores; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}; "
        f"torch threads {torch.get_num_threads()} on both sides (and in the worker process).",
        f"Models: {b.smol.label} ({shape}) and a tiny random Llama (2 layers, hidden 64, vocab 128), "
        "float32 on CPU; checkpoints in the page cache (warm).",
        f"Memory read bandwidth: {b.bandwidth / 1e9:.1f} GB/s (best of 5 sums over a 1 GiB float32 tensor).",
        *gemm_line(b),
        "Figures: median (p10–p90) over alternating rounds (ours and reference back to back in every "
        "round); ratio = ours ÷ reference, the median of the per-round ratios. Reference: transformers, "
        "the faster of its eager and sdpa attention for each row (named).",
    ]


def gemm_line(b: Bench) -> list[str]:
    """Which matmul kernel our float32 models ran (--cpu-gemm auto) and what each kernel takes for
    SmolLM2's decode GEMVs alone on this host."""
    from .inprocess import matmul_floor

    smol = b.ours.get(b.smol.label)
    if smol is None:
        return []
    floors = ", ".join(
        f"{kernel} {matmul_floor(smol, kernel=kernel)[0] * 1e3:.1f} ms"
        for kernel in ("torch", "onednn", "mv+torch")
    )
    return [
        f"Matmul kernels of our float32 layers: {smol.cpu_gemm} (`--cpu-gemm auto` measured "
        f"{calibrate_cpu_gemm().describe()} before the bench's workers started, which run the same; "
        "transformers runs torch's). "
        f"SmolLM2's decode GEMVs alone: {floors}."
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    items = {int(x) for x in args.items.split(",") if x.strip()} or set(ITEMS)
    if 6 in items:
        items.add(3)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    quiet_transformers()
    started = datetime.now()
    began = time.monotonic()
    cpu_start = CpuSnapshot.take()
    report = Report()
    with tempfile.TemporaryDirectory(prefix="modelworker-bench-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            models = [smollm2(), tiny(tmp / "models")]
        except BenchSetupError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        b = Bench(args.quick, threads, report, new_registry([m.root for m in models]), models)
        roots = [m.root for m in models]
        # cpu_gemm auto's measurement, alone on the machine: the workers started next would each
        # measure at start, all at once, and could pick other kernels through the contention; they
        # run what the bench process runs.
        gemm_env = {"MODELWORKER_CPU_GEMM": calibrate_cpu_gemm().choice}
        worker = load_worker = kv_worker = None
        if items & {5, 7, 8, 9, 10, 11}:
            worker = serving.WorkerProcess(roots, threads, tmp / "worker.log", gemm_env)
        if 9 in items:  # the receiving end of the KV transfers
            kv_worker = serving.WorkerProcess(roots, threads, tmp / "kv-worker.log", gemm_env)
        if 1 in items:  # its own worker, whose Loads land in fresh pages (see serving.load)
            load_worker = serving.WorkerProcess(
                roots, threads, tmp / "load-worker.log", {**FRESH_PAGES_ENV, **gemm_env}
            )
        try:
            print(f"loading models ({threads} torch threads)...", flush=True)
            for model in models:
                b.ours[model.label] = load_ours(b.registry, _local_id(model), model, BENCH_KV)
                b.refs[model.label] = {attn: load_reference(model, attn) for attn in ("eager", "sdpa")}
            for w in (worker, load_worker, kv_worker):
                if w is not None:
                    w.wait_ready()
            b.bandwidth = read_bandwidth(GiB, reps=5)
            run_items(b, items, worker, load_worker, kv_worker)
            if 12 in items:
                print("12. tiny MoE prefill and decode...", flush=True)
                moe.moe(b, tmp / "moe-models")
            if 15 in items:  # its own rank processes, after the in-process items
                print("15. tensor parallelism over 2 gloo ranks...", flush=True)
                tensor_parallel.item(b, b.smol.path)
        finally:
            for w in (worker, load_worker, kv_worker):
                if w is not None:
                    w.stop()
    report.header = header(b, started)
    foreign = foreign_cpu_share(cpu_start, CpuSnapshot.take(), usable_cores())
    report.header.append(
        f"Other processes used {foreign:.0%} of the cores' time during the run"
        + (": expect noise (rows marked noisy), and rerun on a quiet machine." if foreign > 0.05 else ".")
    )
    for row in report.rows:
        reason = b.reasons.get(row.key) or REASONS.get(row.key)
        if row.met is False and reason:
            row.note = f"{reason}; {row.note}" if row.note else reason
    report.footer = [f"Run time: {time.monotonic() - began:.0f} s."]
    text = report.markdown()
    print()
    print(text)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{platform.node()}-{started:%Y-%m-%d}{'-quick' if args.quick else ''}.md"
        path.write_text(text)
        print(f"written to {path}")
    return 0


def _local_id(model: BenchModel) -> str:
    return "bench-" + model.label.lower().replace(" ", "-")


def run_items(
    b: Bench,
    items: set[int],
    worker: serving.WorkerProcess | None,
    load_worker: serving.WorkerProcess | None,
    kv_worker: serving.WorkerProcess | None = None,
) -> None:
    remote = {b.smol.label: "smol-a", b.models[1].label: "tiny-a"}
    if 7 in items:
        assert worker is not None
        print("7. memory of the worker process...", flush=True)
        serving.memory(b, worker, remote[b.smol.label])  # first: the worker has loaded nothing yet
    if 1 in items:
        assert load_worker is not None
        print("1. load...", flush=True)
        serving.load(b, load_worker)
        load_worker.stop()
    steps = (
        (2, "prefill", inprocess.prefill),
        (3, "decode step", inprocess.decode),
        (4, "batched decode", inprocess.batched_decode),
        (6, "roofline", inprocess.roofline),
        (13, "quantized decode", quantized.quantized_decode),
        (14, "llama.cpp as the CPU peer", llamacpp.llamacpp),
    )
    for number, title, fn in steps:
        if number in items:
            print(f"{number}. {title}...", flush=True)
            fn(b)
    if items & {5, 8}:
        assert worker is not None
        if 7 not in items:
            serving.load_remote(worker, remote[b.smol.label], b.smol)
        serving.load_remote(worker, remote[b.models[1].label], b.models[1], BENCH_KV)
    if 5 in items:
        assert worker is not None
        print("5. gRPC overhead...", flush=True)
        serving.grpc_overhead(b, worker, remote)
    if 8 in items:
        assert worker is not None
        print("8. concurrent clients...", flush=True)
        serving.load_remote(worker, "smol-b", b.smol)
        serving.concurrency(b, worker, [remote[b.smol.label], "smol-b"])
    if 9 in items:
        assert worker is not None and kv_worker is not None
        print("9. KV block transfer...", flush=True)
        kv_transfer.kv_transfer(b, worker, kv_worker)
    if 10 in items:
        assert worker is not None
        print("10. sampling on the worker...", flush=True)
        sampling.run(b, worker)
    if 11 in items:
        assert worker is not None
        print("11. weight updates and memory release...", flush=True)
        weight_updates.updates(b, worker)


if __name__ == "__main__":
    sys.exit(main())
