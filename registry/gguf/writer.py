"""Writing the HF-layout directory: safetensors (sharded past a size) streamed one tensor at a time,
config.json, tokenizer files when transformers can convert them, and the marker of a complete import.
Everything goes into a temporary sibling directory that is renamed into place at the end."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from .config import build_config
from .keep_quant import kept_shapes, kept_tensors, plan_kept, quantization_config
from .reader import GgufFile, GgufImportError, read_gguf
from .tensors import TensorPlan, convert_tensor, plan_tensors

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default shard size ("5GB")
MARKER_FILE = "gguf_import.json"
MARKER_FORMAT = 1
OUTPUT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16"}


class Progress:
    """A plain-text progress bar on a terminal (nothing otherwise)."""

    def __init__(self, total: int, label: str, enabled: bool | None, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.label, self.done, self.count = max(total, 1), label, 0, 0
        self.start = self.last = time.monotonic()

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        self.count += 1
        now = time.monotonic()
        if self.enabled and (now - self.last >= 0.1 or self.done >= self.total):
            self.last = now
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            self.stream.write(
                f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {self.count} tensors, "
                f"{self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB, {now - self.start:.1f}s"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()

    def step(self, text: str) -> None:
        """A line for a slow step that has no bar (shown when the bar would be)."""
        if self.enabled:
            self.stream.write(f"{text}\n")
            self.stream.flush()


@dataclass(frozen=True)
class _Output:
    """One safetensors tensor: a dense weight in the output dtype, or a kept projection's part."""

    name: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]
    plan: TensorPlan
    suffix: str = ""  # kept projections: gguf_codes / gguf_scales / gguf_mins

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE[self.dtype]


_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1}


def _outputs(plans: Sequence[TensorPlan], dtype: torch.dtype) -> list[_Output]:
    out = []
    for plan in plans:
        if plan.keep is None:
            out.append(_Output(plan.hf_name, SAFETENSORS_DTYPE[dtype], plan.shape, plan))
            continue
        layer = plan.hf_name.removesuffix(".weight")
        for suffix, (st_dtype, shape) in kept_shapes(plan).items():
            out.append(_Output(f"{layer}.{suffix}", st_dtype, shape, plan, suffix))
    return out


def _shards(outputs: Sequence[_Output], max_shard_bytes: int) -> list[list[_Output]]:
    """Consecutive groups under max_shard_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[_Output]] = [[]]
    size = 0
    for output in outputs:
        n = output.nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(output)
        size += n
    return shards


def _write_safetensors(
    path: Path, gf: GgufFile, outputs: Sequence[_Output], dtype: torch.dtype, progress: Progress
) -> None:
    """One safetensors file, header first (every size is known), then each tensor as converted."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for output in outputs:
        header[output.name] = {
            "dtype": output.dtype,
            "shape": list(output.shape),
            "data_offsets": [offset, offset + output.nbytes],
        }
        offset += output.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    kept: dict[str, Any] = {}  # the parts of the kept projection being written
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for output in outputs:
            if output.suffix:
                if output.plan.hf_name not in kept:
                    kept = {output.plan.hf_name: kept_tensors(gf, output.plan)}
                f.write(kept[output.plan.hf_name][output.suffix].tobytes())
            else:
                tensor = convert_tensor(gf, output.plan, dtype)
                # bytes of a little-endian host (safetensors is little-endian; so is every torch target)
                f.write(tensor.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).numpy())
            progress.update(output.nbytes)


def _write_weights(
    out: Path,
    gf: GgufFile,
    outputs: Sequence[_Output],
    dtype: torch.dtype,
    max_shard_bytes: int,
    progress: Progress,
) -> list[str]:
    shards = _shards(outputs, max_shard_bytes)
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", gf, outputs, dtype, progress)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        _write_safetensors(out / name, gf, shard, dtype, progress)
        weight_map.update({o.name: name for o in shard})
    index = {"metadata": {"total_size": sum(o.nbytes for o in outputs)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return [*names, "model.safetensors.index.json"]


def _write_tokenizer(gguf_path: Path, out: Path) -> tuple[list[str], str]:
    """tokenizer.json and friends through transformers' own GGUF tokenizer conversion, when
    transformers is installed (it is not a runtime dependency). Returns (files, a one-line note)."""
    if importlib.util.find_spec("transformers") is None:
        return [], "transformers is not installed: no tokenizer files written"
    before = {p.name for p in out.iterdir()}
    try:
        import transformers

        # transformers reads a GGUF through its directory; a directory holding only the file keeps
        # any tokenizer files lying next to it from being read instead.
        with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as alone:
            link = Path(alone) / gguf_path.name
            link.symlink_to(gguf_path)
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                alone, gguf_file=link.name, local_files_only=True
            )
        tokenizer.save_pretrained(str(out))
    except Exception as exc:  # a tokenizer transformers cannot convert leaves the weights usable
        for p in out.iterdir():
            if p.name not in before:
                p.unlink()
        reason = (str(exc).splitlines() or [""])[0][:200]
        return [], f"transformers could not convert the GGUF tokenizer ({type(exc).__name__}: {reason})"
    files = sorted(p.name for p in out.iterdir() if p.name not in before)
    return files, f"tokenizer converted by transformers {transformers.__version__}"


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file (streamed)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def read_marker(out_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((Path(out_dir) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def is_complete_import(
    out_dir: Path,
    gguf_path: Path,
    dtype: str | None = None,
    fingerprint: dict[str, Any] | None = None,
    keep_quant: str | None = None,
) -> bool:
    """Whether out_dir holds a complete import of this very file (same size and sha256), in `dtype`
    if given and with this `keep_quant`, with every file it wrote still there at its size."""
    marker = read_marker(out_dir)
    if marker is None:
        return False
    source = marker.get("source")
    size = Path(gguf_path).stat().st_size
    if (
        not isinstance(source, dict)
        or source.get("size") != size
        or (dtype is not None and marker.get("dtype") != dtype)
        or marker.get("keep_quant") != keep_quant
    ):
        return False
    files = marker.get("files")
    if not isinstance(files, dict):
        return False
    for name, nbytes in files.items():
        p = Path(out_dir) / name
        if Path(name).name != name or not p.is_file() or p.stat().st_size != nbytes:
            return False
    fingerprint = fingerprint or file_fingerprint(gguf_path)
    return source.get("sha256") == fingerprint["sha256"]


def _prepare_destination(out_dir: Path, force: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise GgufImportError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not force:
            raise GgufImportError(f"{out_dir}: directory exists and is not empty (use --force to replace it)")


def _remove_abandoned_imports(out_dir: Path) -> None:
    """Temporary directories of imports into out_dir whose process died without cleaning up (killed)."""
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(?:import|old)-(\d+)-[0-9a-f]+")
    for sibling in out_dir.parent.iterdir():
        m = pattern.fullmatch(sibling.name)
        if m and sibling.is_dir() and not _process_alive(int(m.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished tmp directory to out_dir; an existing out_dir is swapped out, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        if old is not None:
            old.rename(out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class ImportResult:
    out_dir: Path
    architecture: str
    num_parameters: int
    weight_bytes: int
    files: tuple[str, ...]
    tokenizer_note: str
    seconds: float


def import_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool | None = None,
    *,
    force: bool = False,
    tokenizer: bool = True,
    keep_quant: str | None = None,
) -> Path:
    """Convert a GGUF file into an HF-layout directory at out_dir and return out_dir.

    progress: None shows a bar when stderr is a terminal. force: replace a non-empty out_dir.
    tokenizer: also write tokenizer files (needs transformers; skipped with a note otherwise).
    keep_quant: "int4" / "int8" keeps the projections' Q4_0/Q4_1/Q8_0 blocks as they are (keep_quant.py).
    Raises GgufImportError; on any failure out_dir is left as it was.
    """
    return import_gguf_detailed(
        gguf_path,
        out_dir,
        dtype,
        max_shard_bytes,
        progress,
        force=force,
        tokenizer=tokenizer,
        keep_quant=keep_quant,
    ).out_dir


def import_gguf_detailed(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool | None = None,
    *,
    force: bool = False,
    tokenizer: bool = True,
    fingerprint: dict[str, Any] | None = None,
    keep_quant: str | None = None,
) -> ImportResult:
    """`import_gguf`, returning what was written."""
    start = time.monotonic()
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir).absolute()
    if dtype not in OUTPUT_DTYPES:
        raise GgufImportError(f"dtype {dtype!r} is not supported (supported: {', '.join(OUTPUT_DTYPES)})")
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise GgufImportError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    if out_dir == gguf_path or out_dir.resolve() in gguf_path.parents:
        raise GgufImportError(
            f"{out_dir}: holds the source file {gguf_path}; choose another output directory"
        )
    _prepare_destination(out_dir, force)
    gf = read_gguf(gguf_path)
    config = build_config(gf, dtype)
    plans = plan_tensors(gf, config)
    if keep_quant is not None:
        plans = plan_kept(gf, plans, keep_quant)
        config["quantization_config"] = quantization_config(plans, keep_quant)
    torch_dtype = OUTPUT_DTYPES[dtype]
    outputs = _outputs(plans, torch_dtype)
    total = sum(o.nbytes for o in outputs)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_imports(out_dir)
    free = shutil.disk_usage(out_dir.parent).free
    if free < total:
        raise GgufImportError(f"{out_dir.parent}: {total / 1e6:.0f} MB needed, only {free / 1e6:.0f} MB free")
    tmp = out_dir.with_name(f".{out_dir.name}.import-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    bar = Progress(total, f"import {gguf_path.name}", progress)
    try:
        files = _write_weights(tmp, gf, outputs, torch_dtype, max_shard_bytes, bar)
        bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        files.append("config.json")
        note = "tokenizer files not requested"
        if tokenizer and "tokenizer.ggml.tokens" in gf.metadata:
            bar.step("converting the tokenizer with transformers (slower than the weights)...")
            tok_files, note = _write_tokenizer(gguf_path, tmp)
            files.extend(tok_files)
        elif tokenizer:
            note = "the GGUF file has no tokenizer"
        marker = {
            "format": MARKER_FORMAT,
            "source": {"path": str(gguf_path), **(fingerprint or file_fingerprint(gguf_path))},
            "dtype": dtype,
            "keep_quant": keep_quant,
            "gguf_architecture": gf.architecture,
            "gguf_package": _package_version("gguf"),
            "tokenizer": note,
            "files": {name: (tmp / name).stat().st_size for name in sorted(files)},
        }
        # Written last: its presence (after the rename) is what marks the import as complete.
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _replace_dir(tmp, out_dir)
    except BaseException:
        if bar.done < total:
            bar.close()  # end the bar's line before the error message
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ImportResult(
        out_dir,
        config["architectures"][0],
        sum(math.prod(p.shape) for p in plans),
        total,
        tuple(sorted(files)),
        note,
        time.monotonic() - start,
    )


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
