"""`make gpu-check`: the checks to run on a lent GPU machine, in one go.

1. prints the card, torch, CUDA and flash-attn versions ("not installed" when it is absent: the
   flash_attn backend is then NOT tested, and the last line says so);
2. runs the repository's GPU tests (`pytest -m gpu` over the files that hold gpu-marked tests only,
   so a machine without the test-only packages of other files can still run them);
3. for each attention backend that can run here and each half dtype, measures the paged attention's
   max error against a float64 reference (1B-class head layout: 32 query heads, 8 KV heads,
   head_dim 64; prefill, decode, prefix-cached prefill, mixed batch, a sliding window) and the decode
   step time at batch 1/16/64 of a 1B-class random-weight Llama (hidden 2048, 16 layers, 32 heads,
   8 KV heads, intermediate 8192, vocab 32000) built directly on the device, no checkpoint read;
4. the hot path's rows (bench/gpu_hot_path.py) and the quantized kernels' rows (bench/gpu_quantized.py:
   int8 / int4 / fp8 decode step against bfloat16, the kernel each layer got);
5. with several GPUs visible, one model sharded over all of them with NCCL (bench/gpu_tensor_parallel.py:
   logits against one GPU, decode step time); skipped with one GPU;
6. prints the markdown tables and writes them under bench/results/.

Without a GPU it says so and exits 0 at once; when `nvidia-smi` lists a GPU that torch cannot use
(a CUDA build newer than the driver, a CPU build of torch) it fails loudly (exit 1). Exit status: 1 if
the GPU tests or a measurement failed, or `--require-flash` and flash-attn is not usable.
`make gpu-check GPU_CHECK_PYTHON=/path/to/python` runs it with an existing environment, installing
nothing (GPU machines may have no network).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LLAMA_1B: dict = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    hidden_act="silu",
)
BATCH_SIZES = (1, 16, 64)
BLOCK_SIZE = 256  # flash_attn's paged cache needs a multiple of 256; the torch backend uses the same
CONTEXT = 512  # tokens already in each sequence's cache at the timed decode step


@dataclass
class Row:
    backend: str
    dtype: str
    max_error: float | None = None
    decode_ms: dict[int, float] = field(default_factory=dict)
    failure: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attention_error(
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
    *,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 64,
    block_size: int = BLOCK_SIZE,
) -> float:
    """Max |paged attention - float64 reference| over a scheduler-like run (see PagedSim)."""
    from architectures.backends import select_backend
    from architectures.paged import PagedKvCache
    from tests.architectures_paged.reference import PagedSim

    chosen = select_backend(backend, device=device, dtype=dtype, block_size=block_size, head_dim=head_dim)
    lengths = [300, 20, 513]
    blocks = 3 * sum(math.ceil(n / block_size) + 2 for n in lengths)
    cache = PagedKvCache(2, blocks, block_size, num_kv_heads, head_dim, dtype, device)
    sim = PagedSim(cache, chosen, num_heads, windows=[None, 100], seed=0)
    errors = [sim.step([(0, lengths[0]), (1, lengths[1]), (2, lengths[2])])]
    errors.append(sim.step([(0, 1), (1, 1), (2, 1)], is_prefill=False))
    sim.release(1)
    sim.fork(2, 3, blocks=lengths[2] // block_size)
    errors.append(sim.step([(0, 7), (3, 9)]))
    errors.append(sim.step([(2, 1), (4, 33), (3, 1)]))
    return max(errors)


def build_network(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A Llama with random weights (std 0.02, norms at 1) allocated straight on the device."""
    from architectures.llama import LlamaForCausalLM
    from registry import ModelConfig

    config = ModelConfig.from_hf(shape)
    with torch.device("meta"):
        network = LlamaForCausalLM(config)
    network = network.to(dtype=dtype).to_empty(device=device)
    network.tie_weights(config)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return network.eval().requires_grad_(False)


def wrap_model(
    network: torch.nn.Module, shape: dict, device, dtype, backend: str, num_blocks: int, block_size: int
):
    from pathlib import Path

    from architectures.backends import BACKENDS
    from architectures.base import CausalLM
    from registry import KvCacheOptions, LoadOptions, ModelConfig
    from registry.load_plan import make_load_plan

    options = LoadOptions(
        dtype=dtype,
        attention_backend=backend,
        kv_cache=KvCacheOptions(
            block_size=block_size, num_blocks=num_blocks, max_seq_len=64, max_batch_size=1
        ),
    )
    config = ModelConfig.from_hf(shape)
    plan = make_load_plan(
        Path("."), config.architecture, config, options, torch.device(device), BACKENDS, weight_bytes=0
    )
    return CausalLM(network, plan)


def decode_ms(model, batch: int, context: int, iters: int, warmup: int = 3) -> float:
    """Mean wall time of one decode step (validation, forward, float32 logits) of `batch`
    sequences that each hold `context` tokens, on distinct blocks."""
    bs = model.cache_spec.block_size
    per_seq = math.ceil((context + 1) / bs)
    tables = [[s * per_seq + j for j in range(per_seq)] for s in range(batch)]
    gen = torch.Generator().manual_seed(batch)
    call = dict(
        input_tokens=torch.randint(0, model.config.vocab_size, (batch,), generator=gen),
        positions=torch.full((batch,), context),
        block_tables=tables,
        slot_mapping=torch.tensor([t[context // bs] * bs + context % bs for t in tables]),
        context_lens=[context + 1] * batch,
        is_prefill=False,
    )
    for _ in range(warmup):
        model.forward_paged(**call)
    _sync(model.device)
    start = time.perf_counter()
    for _ in range(iters):
        model.forward_paged(**call)
    _sync(model.device)
    return (time.perf_counter() - start) / iters * 1000


def measure(
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
    backends: list[str],
    *,
    shape: dict = LLAMA_1B,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    context: int = CONTEXT,
    block_size: int = BLOCK_SIZE,
    iters: int = 20,
    attention_kwargs: dict | None = None,
) -> list[Row]:
    rows = []
    per_seq = math.ceil((context + 1) / block_size)
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        network = None
        for backend in backends:
            row = Row(backend, name)
            rows.append(row)
            try:
                row.max_error = attention_error(
                    device, dtype, backend, block_size=block_size, **(attention_kwargs or {})
                )
                if network is None:
                    network = build_network(shape, device, dtype)
                model = wrap_model(
                    network, shape, device, dtype, backend, per_seq * max(batch_sizes), block_size
                )
                assert model.attention_backend == backend, model.attention_backend
                for b in batch_sizes:
                    row.decode_ms[b] = decode_ms(model, b, context, iters)
                del model
            except Exception as exc:  # keep measuring the other rows; the traceback goes to stderr
                traceback.print_exc()
                row.failure = f"{type(exc).__name__}: {exc}"
        del network
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def format_table(card: str, rows: list[Row], batch_sizes: tuple[int, ...] = BATCH_SIZES) -> str:
    head = ["card", "backend", "dtype", "max err vs fp64 ref"] + [
        f"decode ms @ batch {b}" for b in batch_sizes
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        err = "—" if r.max_error is None else f"{r.max_error:.2e}"
        times = [f"{r.decode_ms[b]:.2f}" if b in r.decode_ms else "—" for b in batch_sizes]
        cells = [card, r.backend, r.dtype, err] + times
        lines.append("| " + " | ".join(cells) + " |")
        if r.failure:
            lines.append(f"|  | ↳ failed: {r.failure.replace('|', '/')[:200]} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def _flash_version() -> str:
    try:
        return importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def nvidia_smi_gpus() -> list[str] | None:
    """`nvidia-smi -L` lines (one per GPU the driver sees); None when nvidia-smi is absent or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return [line.strip() for line in out.stdout.splitlines() if line.strip().startswith("GPU ")]


def unusable_gpu_reason(
    driver_gpus: list[str] | None, torch_sees_cuda: bool, env: dict[str, str]
) -> str | None:
    """Why the driver's GPUs are not usable from torch, or None (no GPU, torch sees it, or the
    environment hides it on purpose with an empty CUDA_VISIBLE_DEVICES)."""
    if torch_sees_cuda or not driver_gpus:
        return None
    if env.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return None
    built = torch.version.cuda
    hint = (
        "torch is a CPU build: install a CUDA build (make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128)"
        if not built
        else f"torch is built for CUDA {built}; the driver may be older than that CUDA needs "
        "(CUDA 13: driver >= 580; CUDA 12.8: >= 570), see nvidia-smi's header"
    )
    return f"nvidia-smi sees {len(driver_gpus)} GPU(s) ({driver_gpus[0]}) but torch.cuda.is_available() is False: {hint}"


def gpu_test_files(root: Path = REPO / "tests") -> list[Path]:
    """Test files that hold gpu-marked tests; only these are collected."""
    return sorted(p for p in root.rglob("test_*.py") if "mark.gpu" in p.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--skip-tests", action="store_true", help="do not run pytest -m gpu")
    parser.add_argument("--iters", type=int, default=20, help="timed decode steps per batch size")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--require-flash", action="store_true", help="fail when flash-attn is not usable")
    args = parser.parse_args(argv)

    print("# modelworker gpu-check")
    print(f"python {sys.executable}", flush=True)
    if not torch.cuda.is_available():
        problem = unusable_gpu_reason(nvidia_smi_gpus(), False, dict(os.environ))
        if problem is not None:
            print(f"FAILED: {problem}", file=sys.stderr)
            return 1
        print(
            "no CUDA: skipping the GPU checks (pytest -m gpu, flash_attn, decode timings, tensor parallelism)"
        )
        return 0
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    header = [
        f"card: {card} (sm_{major}{minor}, {torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB)",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, flash-attn {_flash_version()}",
        f"nvidia-smi: {'; '.join(nvidia_smi_gpus() or ['not found'])}",
    ]
    print("\n".join(header), flush=True)

    tests = "skipped"
    test_rc = 0
    if not args.skip_tests:
        files = [str(p.relative_to(REPO)) for p in gpu_test_files()]
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *files]
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        test_rc = subprocess.run(cmd, cwd=REPO).returncode
        tests = "passed" if test_rc == 0 else f"FAILED (pytest exit {test_rc})"
        print(f"gpu tests: {tests}", flush=True)

    from architectures.backends import available_backends, flash_attn_unavailable_reason

    flash_reason = flash_attn_unavailable_reason(device, torch.bfloat16, BLOCK_SIZE, 64)
    rows = measure(device, (torch.bfloat16, torch.float16), available_backends(device), iters=args.iters)
    table = format_table(card, rows)
    print()
    print(table)
    from bench.gpu_hot_path import report as hot_path_report  # triton vs torch; decode eager vs graphs

    hot_path, hot_path_failed = hot_path_report(
        device, lambda dt: build_network(LLAMA_1B, device, dt), LLAMA_1B, BATCH_SIZES
    )
    print()
    print(hot_path)
    from bench.gpu_quantized import report as quantized_report  # int8 / int4 / fp8 kernels vs bf16

    quantized, quantized_failed = quantized_report(
        device, lambda dt: build_network(LLAMA_1B, device, dt), LLAMA_1B
    )
    print()
    print(quantized)
    from bench.gpu_tensor_parallel import report as tensor_parallel_report

    print("\ntensor parallelism...", flush=True)
    tensor_parallel, tensor_parallel_failed = tensor_parallel_report(torch.cuda.device_count(), args.iters)
    print(tensor_parallel)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out_dir / f"gpu-check-{stamp}.md"
    shape = f"Llama {LLAMA_1B['hidden_size']}h/{LLAMA_1B['num_hidden_layers']}L/{LLAMA_1B['num_attention_heads']}q"
    shape += f"/{LLAMA_1B['num_key_value_heads']}kv, context {CONTEXT}, block {BLOCK_SIZE}"
    out.write_text(
        "\n".join(
            [
                f"# gpu-check {stamp}",
                "",
                *header,
                f"gpu tests: {tests}",
                shape,
                "",
                table,
                "",
                hot_path,
                "",
                quantized,
                "",
                tensor_parallel,
                "",
            ]
        )
    )
    print(f"\nwritten to {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    failed = (
        test_rc != 0
        or any(r.failure for r in rows)
        or hot_path_failed
        or quantized_failed
        or tensor_parallel_failed
    )
    flash = "tested" if flash_reason is None else f"NOT TESTED ({_flash_summary(flash_reason)})"
    print(f"\nresult: {'FAILED' if failed else 'passed'}; flash_attn backend {flash}")
    if flash_reason is not None and args.require_flash:
        return 1
    return 1 if failed else 0


def _flash_summary(reason: str) -> str:
    return "not installed" if "not installed" in reason else reason


if __name__ == "__main__":
    sys.exit(main())
