"""The worker's settings: one frozen object built once at start.

Precedence, highest first: CLI flags, `MODELWORKER_*` environment variables, the TOML file named by
`--config` (or `MODELWORKER_CONFIG`), then the defaults below. Every source goes through the same
parser and the same validation, so a bad value names its source ("MODELWORKER_PORT: ...").
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

MiB = 1024 * 1024
ENV_PREFIX = "MODELWORKER_"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_MODES = ("mmap", "copy")
CPU_GEMMS = (  # registry/cpu_gemm.py
    "auto",
    "torch",
    "onednn",
    "mv+torch",
    "mv+onednn",
    "onednn+torch",
    "torch+onednn",
)
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
_SIZE_RE = re.compile(r"(\d+)\s*(?:([kmgt])(i)?)?b?", re.IGNORECASE)


class SettingsError(ValueError):
    """A setting has a value the worker cannot run with; the message names the source."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: pick a free port (logged)
    metrics_port: int = 9400  # 0: off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    model_roots: tuple[Path, ...] = (Path("models"),)
    preload: tuple[tuple[str, str], ...] = ()  # (model_id, model_dir)
    max_message_bytes: int = 256 * MiB
    grace_seconds: float = 20.0
    auth_token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    log_level: str = "info"
    log_format: str = "text"
    # Request caps (RESOURCE_EXHAUSTED above them).
    max_tokens_per_request: int = 16384
    max_batch_size: int = 256
    # Bytes of weights + KV cache this worker may hold across all models; 0: only device memory limits.
    memory_budget_bytes: int = 0
    # Tensor parallelism: ranks over all hosts; hosts (torchrun's names) and this host's index;
    # rank 0's address and rendezvous port (0: a free one, single host only).
    tensor_parallel_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    # mmap: CPU weights whose bytes are the checkpoint's stay views of the mapped file (checkpoints
    # must then be replaced by rename, never rewritten in place); copy: every weight is read in.
    load_mode: str = "mmap"
    # The matmul kernels of CPU float32 dense layers: auto (the fastest measured here), torch (MKL on
    # x86), onednn, or GEMV+GEMM for one row and for more (registry/cpu_gemm.py).
    cpu_gemm: str = "auto"
    # torch intra-op threads; 0: $OMP_NUM_THREADS when set, else the cores this process may use.
    threads: int = 0
    # Working memory one ForwardPaged call may need (RESOURCE_EXHAUSTED above it).
    max_call_bytes: int = 4096 * MiB
    # Threads that run Loads (apart from the forwards' threads, so a stuck Load cannot starve them).
    load_threads: int = 2

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def redacted(self) -> dict[str, Any]:
        """For the start-up log line: every setting, the token hidden."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["auth_token"]:
            out["auth_token"] = "***"
        out["model_roots"] = [str(p) for p in self.model_roots]
        out["preload"] = [f"{i}={d}" for i, d in self.preload]
        for key in ("tls_cert", "tls_key", "tls_client_ca"):
            out[key] = str(out[key]) if out[key] else None
        return out


def parse_bytes(text: str | int) -> int:
    """`268435456`, `256MiB`, `1GB`, `512k` → bytes (binary units with `i`, decimal without)."""
    if isinstance(text, bool):
        raise ValueError(f"expected a byte size, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a byte size must be >= 0, got {text}")
        return text
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"expected a byte size like 268435456 or 256MiB, got {text!r}")
    number, prefix, binary = int(m.group(1)), m.group(2), m.group(3)
    if not prefix:
        return number
    return number * (1024 if binary else 1000) ** ("kmgt".index(prefix.lower()) + 1)


def _parse_int(text: str | int) -> int:
    if isinstance(text, bool):
        raise ValueError(f"expected an integer, got {text!r}")
    if isinstance(text, int):
        return text
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def _parse_float(text: str | float) -> float:
    if isinstance(text, bool):
        raise ValueError(f"expected a number, got {text!r}")
    return float(text)


def _parse_str(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {text!r}")
    return text


def _parse_optional_str(text: Any) -> str | None:
    return _parse_str(text) or None


def _parse_optional_path(text: Any) -> Path | None:
    value = _parse_optional_str(text)
    return Path(value) if value else None


def _parse_lower(text: Any) -> str:
    return _parse_str(text).strip().lower()


def _parse_roots(value: Any) -> tuple[Path, ...]:
    items = value.split(os.pathsep) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(i, (str, Path)) for i in items):
        raise ValueError(f"expected a list of directories, got {value!r}")
    roots = tuple(Path(i) for i in items if str(i))
    if not roots:
        raise ValueError("at least one model root is needed")
    return roots


def _parse_preload(value: Any) -> tuple[tuple[str, str], ...]:
    """`id=dir,id2=dir2`, a list of `id=dir`, or a TOML table {id = "dir"}."""
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    else:
        items = [s for s in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"expected ID=DIR items, got {value!r}")
        pairs = []
        for item in items:
            if not isinstance(item, str) or "=" not in item:
                raise ValueError(f"expected ID=DIR, got {item!r}")
            model_id, _, model_dir = item.strip().partition("=")
            pairs.append((model_id.strip(), model_dir.strip()))
    out = []
    for model_id, model_dir in pairs:
        if not model_id or not isinstance(model_dir, str) or not model_dir:
            raise ValueError(f"expected ID=DIR with both parts non-empty, got {model_id!r}={model_dir!r}")
        out.append((model_id, model_dir))
    ids = [i for i, _ in out]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"model id(s) preloaded twice: {', '.join(dupes)}")
    return tuple(out)


# field → parser of a raw value (string from flags/env, or a TOML value).
PARSERS: dict[str, Callable[[Any], Any]] = {
    "host": lambda v: _parse_str(v).strip(),
    "port": _parse_int,
    "metrics_port": _parse_int,
    "device": _parse_lower,
    "dtype": _parse_lower,
    "model_roots": _parse_roots,
    "preload": _parse_preload,
    "max_message_bytes": parse_bytes,
    "grace_seconds": _parse_float,
    "auth_token": _parse_optional_str,
    "tls_cert": _parse_optional_path,
    "tls_key": _parse_optional_path,
    "tls_client_ca": _parse_optional_path,
    "log_level": _parse_lower,
    "log_format": _parse_lower,
    "max_tokens_per_request": _parse_int,
    "max_batch_size": _parse_int,
    "memory_budget_bytes": parse_bytes,
    "tensor_parallel_size": _parse_int,
    "nnodes": _parse_int,
    "node_rank": _parse_int,
    "master_addr": lambda v: _parse_str(v).strip(),
    "master_port": _parse_int,
    "load_mode": _parse_lower,
    "cpu_gemm": _parse_lower,
    "threads": _parse_int,
    "max_call_bytes": parse_bytes,
    "load_threads": _parse_int,
}

# Environment names that are not simply MODELWORKER_<FIELD>.
ENV_NAMES = {"model_roots": "MODELWORKER_MODEL_ROOTS"}


def env_name(field_name: str) -> str:
    return ENV_NAMES.get(field_name, ENV_PREFIX + field_name.upper())


def _validate(s: Settings) -> None:
    def fail(name: str, why: str) -> None:
        raise SettingsError(f"{name}: {why}")

    if not s.host:
        fail("host", "must not be empty")
    for name in ("port", "metrics_port"):
        value = getattr(s, name)
        if not 0 <= value <= 65535:
            fail(name, f"must be in [0, 65535], got {value}")
    if not _DEVICE_RE.fullmatch(s.device):
        fail("device", f"must be auto, cpu, cuda or cuda:N, got {s.device!r}")
    if s.dtype not in DTYPES:
        fail("dtype", f"must be one of {', '.join(DTYPES)}, got {s.dtype!r}")
    if s.max_message_bytes < 64 * 1024 or s.max_message_bytes > 2**31 - 1:
        # gRPC message lengths are signed 32-bit.
        fail("max_message_bytes", f"must be in [65536, 2147483647], got {s.max_message_bytes}")
    if s.grace_seconds < 0:
        fail("grace_seconds", f"must be >= 0, got {s.grace_seconds}")
    if s.log_level not in LOG_LEVELS:
        fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {s.log_level!r}")
    if s.log_format not in LOG_FORMATS:
        fail("log_format", f"must be one of {', '.join(LOG_FORMATS)}, got {s.log_format!r}")
    if s.max_tokens_per_request < 1:
        fail("max_tokens_per_request", f"must be >= 1, got {s.max_tokens_per_request}")
    if s.max_batch_size < 1:
        fail("max_batch_size", f"must be >= 1, got {s.max_batch_size}")
    if s.memory_budget_bytes < 0:
        fail("memory_budget_bytes", f"must be >= 0, got {s.memory_budget_bytes}")
    if s.tensor_parallel_size < 1:
        fail("tensor_parallel_size", f"must be >= 1, got {s.tensor_parallel_size}")
    if s.nnodes < 1 or s.tensor_parallel_size % s.nnodes:
        fail(
            "nnodes", f"must be >= 1 and divide tensor_parallel_size {s.tensor_parallel_size}, got {s.nnodes}"
        )
    if not 0 <= s.node_rank < s.nnodes:
        fail("node_rank", f"must be in [0, nnodes = {s.nnodes}), got {s.node_rank}")
    if not 0 <= s.master_port <= 65535 or (s.nnodes > 1 and s.master_port == 0):
        fail("master_port", f"must be in [1, 65535] with several hosts (0: a free port), got {s.master_port}")
    if s.load_mode not in LOAD_MODES:
        fail("load_mode", f"must be one of {', '.join(LOAD_MODES)}, got {s.load_mode!r}")
    if s.cpu_gemm not in CPU_GEMMS:
        fail("cpu_gemm", f"must be one of {', '.join(CPU_GEMMS)}, got {s.cpu_gemm!r}")
    if s.threads < 0:
        fail("threads", f"must be >= 0 (0: the cores this process may use), got {s.threads}")
    if s.max_call_bytes < 1:
        fail("max_call_bytes", f"must be >= 1, got {s.max_call_bytes}")
    if not 1 <= s.load_threads <= 64:
        fail("load_threads", f"must be in [1, 64], got {s.load_threads}")
    if (s.tls_cert is None) != (s.tls_key is None):
        fail("tls_cert/tls_key", "both are needed for TLS")
    if s.tls_client_ca is not None and s.tls_cert is None:
        fail("tls_client_ca", "mutual TLS needs tls_cert and tls_key as well")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(s, name)
        if path is not None and not path.is_file():
            fail(name, f"{path} is not a readable file")


def effective_threads(threads: int, env: Mapping[str, str] | None = None) -> int:
    """The torch intra-op thread count for `threads` (0: $OMP_NUM_THREADS when it is a positive
    integer, else the cores this process may run on — its affinity, not the machine's count)."""
    if threads:
        return threads
    omp = (os.environ if env is None else env).get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def read_toml(path: Path) -> dict[str, Any]:
    """The TOML file's settings: top-level keys or a [modelworker] table; dashes or underscores."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: {exc}") from None
    if isinstance(data.get("modelworker"), dict):
        data = data["modelworker"]
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in PARSERS:
            raise SettingsError(
                f"config file {path}: unknown setting {key!r} (known: {', '.join(sorted(PARSERS))})"
            )
        out[name] = value
    return out


def build_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
) -> Settings:
    """Merge the sources. `flags` maps field names to raw values (None or absent: not given)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    config_path = config_path or env.get(ENV_PREFIX + "CONFIG") or None
    raw: dict[str, tuple[str, Any]] = {}
    if config_path:
        for name, value in read_toml(Path(config_path)).items():
            raw[name] = (f"config file {config_path}: {name}", value)
    for name in PARSERS:
        value = env.get(env_name(name))
        if value is not None:
            raw[name] = (env_name(name), value)
    for name, value in flags.items():
        if name not in PARSERS:
            raise SettingsError(f"unknown setting {name!r}")
        raw[name] = ("--" + name.replace("_", "-"), value)
    values: dict[str, Any] = {}
    for name, (source, value) in raw.items():
        try:
            values[name] = PARSERS[name](value)
        except ValueError as exc:
            raise SettingsError(f"{source}: {exc}") from None
    try:
        return Settings(**values)
    except SettingsError as exc:
        # Name the source of the offending field when it came from one.
        field_name = str(exc).split(":", 1)[0]
        source = raw.get(field_name, (None,))[0]
        if source:
            raise SettingsError(f"{source}: {str(exc).split(': ', 1)[1]}") from None
        raise
