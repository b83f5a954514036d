"""Item 14: llama.cpp (llama-cpp-python, the `bench` extra) as the CPU peer, side by side with ours
and transformers in the same run: Load (mmap), prefill 128/512 and the decode step at context 512
against the demo model's GGUF requantized to F32 (the very weights of our float32 demo model), and
our int8/int4 decode step against its Q8_0/Q4_1. llama.cpp runs in a subprocess
(bench/llamacpp_runner.py) with the bench's thread count; a crash there costs one row."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from registry import LoadOptions

from .common import Case, Goal, Report, Row
from .context import Bench
from .inprocess import _reference_prefill, decode_reason, gemv_floor, prefill_reason
from .models import BENCH_KV, DECODE_CONTEXT, LOAD_KV, PREFILL_LENGTHS, BenchModel, ReferenceDecoder
from .peer import Comparison, PeerProcess, compare, exit_reason

ROOT = Path(__file__).resolve().parent.parent  # the checkout: `-m bench.llamacpp_runner` runs from here
PYPROJECT = ROOT / "pyproject.toml"
GGUF_CACHE = "smollm2-135m-gguf"  # next to the demo model's directory
FTYPES = {"F32": 0, "Q8_0": 7}  # llama_ftype: LLAMA_FTYPE_ALL_F32, LLAMA_FTYPE_MOSTLY_Q8_0
QUANTIZED = {"int8": "Q8_0", "int4": "Q4_1"}  # ours → the llama.cpp format of the same bits
# ours ÷ llama.cpp F32 (issue 24); the decode goal holds for the eager and the compiled step alike
GOALS = {"load": 1.0, "prefill-512": 0.5, "decode": 1.0, "decode-compiled": 1.0}


def row_titles(model: str) -> list[tuple[str, str]]:
    """(title, key) of every row item 14 prints, in order."""
    rows = [(f"14. Load (mmap) vs llama.cpp F32 (mmap), {model}", "llamacpp-load")]
    rows += [
        (f"14. Prefill {n} tokens vs llama.cpp F32, {model}", f"llamacpp-prefill-{n}")
        for n in PREFILL_LENGTHS
    ]
    rows.append(
        (
            f"14. Decode step, context {DECODE_CONTEXT}, forward_with_cache vs llama.cpp F32, {model}",
            "llamacpp-decode",
        )
    )
    rows.append(
        (
            f"14. Decode step, context {DECODE_CONTEXT}, forward_with_cache compiled (compile_decode) "
            f"vs llama.cpp F32, {model}",
            "llamacpp-decode-compiled",
        )
    )
    for q, fmt in QUANTIZED.items():
        rows.append(
            (
                f"14. Decode step, context {DECODE_CONTEXT}, {q} vs llama.cpp {fmt}, {model}",
                f"llamacpp-decode-{q}",
            )
        )
    return rows


# -- the extra -------------------------------------------------------------------------------------------


def bench_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The `bench` extra's requirements, as pyproject.toml lists them."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    with pyproject.open("rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"]["bench"])


def llama_cpp_importable() -> bool:
    importlib.invalidate_caches()
    return importlib.util.find_spec("llama_cpp") is not None


def ensure_llama_cpp(
    pip: Sequence[str] | None = None, importable: Callable[[], bool] = llama_cpp_importable
) -> tuple[bool, str]:
    """(True, "") when llama_cpp can be imported, installing the `bench` extra into this venv first
    where it is missing; (False, why) when that fails. `pip` replaces the install command (tests)."""
    if importable():
        return True, ""
    cmd = list(pip) if pip is not None else [sys.executable, "-m", "pip", "install", *bench_requirements()]
    print(
        f"14. llama-cpp-python is not installed: installing the bench extra into {sys.prefix} "
        f"(`{' '.join(cmd)}`; without a wheel for this platform it compiles llama.cpp, minutes)...",
        flush=True,
    )
    began = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.monotonic() - began
    if proc.returncode != 0:
        # pip's last error line says why (stderr); its progress goes to stdout
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or [
            ln for ln in proc.stdout.splitlines() if ln.strip()
        ]
        reason = lines[-1].strip() if lines else f"pip exited with status {proc.returncode}"
        print(f"   install failed after {took:.0f} s: {reason}", flush=True)
        return False, reason
    if not importable():
        return False, "pip succeeded but llama_cpp is still not importable"
    print(f"   installed in {took:.0f} s", flush=True)
    return True, ""


def not_available_rows(report: Report, model: str, reason: str) -> None:
    for title, key in row_titles(model):
        report.add(Row(title, "—", f"llama.cpp: {reason}", note=reason, key=key))


# -- the GGUF files --------------------------------------------------------------------------------------


def source_gguf() -> Path:
    from tests.real_model import smollm2_gguf

    try:
        return smollm2_gguf()
    except BaseException as exc:  # pytest.skip raises a BaseException subclass
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise FileNotFoundError(f"the demo model's GGUF is not available ({exc})") from None


def gguf_files(src: Path, cache: Path, python: str = sys.executable) -> dict[str, Path | str]:
    """Format → GGUF path (or why there is none): the source Q4_1 itself, and F32 / Q8_0 written once
    from it by llama.cpp's own quantizer (in a subprocess: it may crash) and cached in `cache`."""
    out: dict[str, Path | str] = {"Q4_1": src}
    cache.mkdir(parents=True, exist_ok=True)
    for fmt, ftype in FTYPES.items():
        dst = cache / src.name.replace("Q4_1", fmt)
        if dst.is_file():
            out[fmt] = dst
            continue
        tmp = dst.with_suffix(".tmp")
        print(f"14. writing {dst.name} (llama_model_quantize, ftype {ftype})...", flush=True)
        proc = subprocess.run(
            [python, "-m", "bench.llamacpp_runner", "--convert", str(src), str(tmp), str(ftype)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if proc.returncode == 0 and tmp.is_file():
            tmp.rename(dst)
            out[fmt] = dst
        else:
            tmp.unlink(missing_ok=True)
            out[fmt] = f"conversion to {fmt} failed: {exit_reason(proc.returncode, proc.stderr)}"
    return out


def runner(gguf: Path, threads: int, python: str = sys.executable) -> PeerProcess:
    argv = [python, "-m", "bench.llamacpp_runner", "--model", str(gguf), "--threads", str(threads)]
    return PeerProcess(argv, cwd=ROOT)


# -- the item --------------------------------------------------------------------------------------------


def llamacpp(b: Bench, install: Callable[[], tuple[bool, str]] = ensure_llama_cpp) -> None:
    model = b.smol
    ok, reason = install()
    if not ok:
        not_available_rows(b.report, model.label, f"not installed: {reason}")
        return
    try:
        files = gguf_files(source_gguf(), model.root / GGUF_CACHE)
    except FileNotFoundError as exc:
        not_available_rows(b.report, model.label, str(exc))
        return
    titles = dict((key, title) for title, key in row_titles(model.label))
    f32 = files["F32"]
    if isinstance(f32, str):
        float32_keys = (
            "llamacpp-load",
            *(f"llamacpp-prefill-{n}" for n in PREFILL_LENGTHS),
            "llamacpp-decode",
        )
        for key in (*float32_keys, "llamacpp-decode-compiled"):
            b.report.add(Row(titles[key], "—", f"llama.cpp F32: {f32}", note=f32, key=key))
    else:
        peer = runner(f32, b.threads)
        try:
            _float32_rows(b, model, peer, titles)
        finally:
            peer.stop()
    for q, fmt in QUANTIZED.items():
        key = f"llamacpp-decode-{q}"
        path = files[fmt]
        if isinstance(path, str):
            b.report.add(Row(titles[key], "—", f"llama.cpp {fmt}: {path}", note=path, key=key))
            continue
        peer = runner(path, b.threads)
        try:
            _quantized_row(b, model, peer, q, fmt, titles[key])
        finally:
            peer.stop()


def _float32_rows(b: Bench, model: BenchModel, peer: PeerProcess, titles: dict[str, str]) -> None:
    ours = b.ours[model.label]
    refs = b.refs[model.label]
    load_options = LoadOptions(dtype=torch.float32, device="cpu", kv_cache=LOAD_KV, load_mode="mmap")
    load = Case(
        "ours",
        lambda: b.registry.load_model_auto("bench-llamacpp-load", model.path, False, load_options),
        cleanup=lambda _: b.registry.unload_model("bench-llamacpp-load"),
        collect=True,
    )
    compare(
        b.report,
        peer,
        Comparison(
            titles["llamacpp-load"],
            "llamacpp-load",
            load,
            {"op": "load"},
            "llama.cpp F32",
            Goal(GOALS["load"]),
            unit="s",
        ),
        b.budget(8.0),
    )
    for n in PREFILL_LENGTHS:
        ids = b.tokens(model, 1, n)
        key = f"llamacpp-prefill-{n}"
        others = [Case(attn, lambda hf=hf, ids=ids: _reference_prefill(hf, ids)) for attn, hf in refs.items()]
        stats = compare(
            b.report,
            peer,
            Comparison(
                titles[key],
                key,
                Case("ours", lambda ids=ids: ours.forward(ids, all_logits=False)),
                {"op": "prefill", "tokens": ids[0].tolist()},
                "llama.cpp F32",
                Goal(GOALS[f"prefill-{n}"]) if f"prefill-{n}" in GOALS else "report",
                others=others,
            ),
            b.budget(12.0 if n > 128 else 6.0),
            max_reps=30,
        )
        if stats is not None and f"prefill-{n}" in GOALS:
            b.reasons[key] = prefill_reason(ours, n, stats["ours"], stats["peer"])
    ctx = DECODE_CONTEXT
    ids = b.tokens(model, 1, ctx)
    step = ids[:, ctx - 1 :]
    decoders = {attn: ReferenceDecoder(hf, ids[:, : ctx - 1]) for attn, hf in refs.items()}
    others = [Case(attn, lambda d=d: d.step(step), prepare=d.rewind) for attn, d in decoders.items()]
    for key, decoder in (("llamacpp-decode", ours), ("llamacpp-decode-compiled", b.compiled_model(model))):
        decoder.reset_kv_cache()
        decoder.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
        stats = compare(
            b.report,
            peer,
            Comparison(
                titles[key],
                key,
                Case("ours", lambda d=decoder: d.forward_with_cache(step, ctx - 1, 1, all_logits=False)),
                {"op": "step", "token": int(step[0, 0])},
                "llama.cpp F32",
                Goal(GOALS[key.removeprefix("llamacpp-")]),
                setup=[{"op": "context", "tokens": ids[0, : ctx - 1].tolist()}],
                others=others,
            ),
            b.budget(8.0),
            min_reps=5,
            max_reps=200,
            warmup=2,
        )
        if stats is not None:
            if model.label not in b.gemv_floors:
                b.gemv_floors[model.label] = gemv_floor(ours)
            kind = "compiled" if key.endswith("compiled") else "with_cache"
            b.reasons[key] = (
                f"{decode_reason(b, model, stats['ours'], kind)}; llama.cpp's whole step takes "
                f"{stats['peer'].median * 1e3:.1f} ms"
            )


def _quantized_row(b: Bench, model: BenchModel, peer: PeerProcess, q: str, fmt: str, title: str) -> None:
    """Our `q` model (quantized while loading, as item 13) against llama.cpp's `fmt` GGUF."""
    ctx = DECODE_CONTEXT
    model_id = f"bench-llamacpp-{q}"
    b.registry.load_model_auto(
        model_id, model.path, False, LoadOptions(device="cpu", quantization=q, kv_cache=BENCH_KV)
    )
    try:
        ours = b.registry.get_model(model_id)
        ids = b.tokens(model, 1, ctx)
        step = ids[:, ctx - 1 :]
        ours.forward_with_cache(ids[:, : ctx - 1], 0, ctx - 1, all_logits=False)
        compare(
            b.report,
            peer,
            Comparison(
                title,
                f"llamacpp-decode-{q}",
                Case("ours", lambda: ours.forward_with_cache(step, ctx - 1, 1, all_logits=False)),
                {"op": "step", "token": int(step[0, 0])},
                f"llama.cpp {fmt}",
                "report",
                setup=[{"op": "context", "tokens": ids[0, : ctx - 1].tolist()}],
            ),
            b.budget(8.0),
            min_reps=5,
            max_reps=200,
            warmup=2,
        )
    finally:
        b.registry.unload_model(model_id)
