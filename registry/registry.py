"""ModelRegistry: architecture name → builder, and model id → loaded model (seed §3.3).

Two maps with two locks; no lock is held while weights are read. A model that is loading is listed
as LOADING but cannot be used; a failed load leaves the registry exactly as it was. Exclusive use of
a model (`get_model_mut`) goes through a per-model lock that Unload also takes, so weights are never
freed under a running forward.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .backends import BackendRegistry
from .config import ModelConfig, read_config_json
from .cpu_gemm import resolve_cpu_gemm
from .errors import (
    InvalidArgument,
    InvalidConfig,
    ModelAlreadyExists,
    ModelNotFound,
    ModelNotReady,
    ModelSleeping,
    UnknownArchitecture,
)
from .load_plan import LoadPlan, is_quantized_load, make_load_plan, resolve_dtype
from .model import LoadOptions, Model, ModelBuilder
from .parallel import SINGLE
from .paths import resolve_model_dir
from .safetensors_loader import LOAD_MODES

# Called with the Load's plan before anything is built; raising refuses the Load (the worker checks
# memory there).
Admission = Callable[[LoadPlan], None]

MODEL_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    # Weights and/or KV cache released (registry.memory); forwards are refused until resumed.
    SLEEPING = "SLEEPING"


def validate_model_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not MODEL_ID_PATTERN.fullmatch(model_id):
        raise InvalidArgument(f"model_id {model_id!r} must be 1-128 characters of [A-Za-z0-9._-]")
    if model_id in (".", ".."):
        raise InvalidArgument(f"model_id {model_id!r} is reserved")
    return model_id


@dataclass(frozen=True)
class LoadSpec:
    """What makes two Loads of one id the same load."""

    model_dir: Path
    architecture: str
    options: LoadOptions


@dataclass
class ModelEntry:
    model_id: str
    spec: LoadSpec
    state: ModelState = ModelState.LOADING
    model: Model | None = None
    load_seconds: float = 0.0
    loaded_at: float = 0.0  # unix time
    # Held for every use of the model and by unload: exclusive access (seed get_model_mut).
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set when the load finished, successfully or not; concurrent loads of the same spec wait on it.
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # +1 per applied weight update (registry.weight_update); 0 is the checkpoint Load read.
    weights_version: int = 0
    # Where the current weights can be read again (the Load's or the last UpdateWeights' directory);
    # None after an update from a stream or a broadcast, whose tensors exist nowhere on disk.
    weights_source: Path | None = None
    # What ReleaseMemory freed (a registry.memory.ReleasedMemory) while the entry is SLEEPING.
    released: object | None = None

    @property
    def architecture(self) -> str:
        return self.spec.architecture


@dataclass(frozen=True)
class LoadOutcome:
    entry: ModelEntry
    already_loaded: bool
    # The model this load produced or joined. An Unload waiting for the load may clear entry.model
    # as soon as the load is done, before the caller looks; None if it did so before a joiner looked.
    model: Model | None = None


class ModelRegistry:
    def __init__(self, device: str | torch.device = "cpu", model_roots: Sequence[Path] | None = None) -> None:
        self.device = torch.device(device)
        self.model_roots = tuple(Path(r) for r in model_roots) if model_roots else ()
        self._architectures: dict[str, ModelBuilder] = {}
        self._takes_plan: dict[str, bool] = {}
        # Attention backends by name; filled by `architectures.register_builtin` (and plugins).
        self.attention_backends: BackendRegistry[Any] = BackendRegistry()
        # This process's rank of a tensor-parallel group; every Load's plan carries it.
        self.parallel = SINGLE
        self._arch_lock = threading.RLock()
        self._models: dict[str, ModelEntry] = {}
        self._models_lock = threading.RLock()

    # -- architectures -------------------------------------------------------------------------
    def register_architecture(self, name: str, builder: ModelBuilder) -> None:
        """`builder(model_dir, device, options)` builds a Model; one that also takes a `plan`
        keyword gets the Load's LoadPlan (config, dtype, cache sizes, backend) instead of
        re-deriving it."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument("architecture name must be a non-empty string")
        if not callable(builder):
            raise InvalidArgument(f"builder for {name} is not callable")
        with self._arch_lock:
            self._architectures[name] = builder
            self._takes_plan[name] = _takes_plan(builder)

    def get_builder(self, name: str) -> ModelBuilder | None:
        with self._arch_lock:
            return self._architectures.get(name)

    def list_architectures(self) -> list[str]:
        with self._arch_lock:
            return sorted(self._architectures)

    def _require_builder(self, name: str) -> ModelBuilder:
        builder = self.get_builder(name)
        if builder is None:
            known = ", ".join(self.list_architectures()) or "none"
            raise UnknownArchitecture(f"architecture {name!r} is not registered (registered: {known})")
        return builder

    def resolve_dir(self, model_dir: str | Path) -> Path:
        return resolve_model_dir(model_dir, self.model_roots)

    def detect_architecture(self, model_dir: str | Path) -> str:
        """architectures[0] of config.json; it must be registered."""
        path = self.resolve_dir(model_dir)
        return self._architecture_of(read_config_json(path / "config.json"), path)

    def _architecture_of(self, cfg: dict[str, Any], path: Path) -> str:
        archs = cfg.get("architectures")
        if not isinstance(archs, list) or not archs:
            raise InvalidConfig(f'{path / "config.json"}: "architectures" is missing or empty')
        name = archs[0]
        if not isinstance(name, str) or not name:
            raise InvalidConfig(f"{path / 'config.json'}: architectures[0] must be a non-empty string")
        self._require_builder(name)
        return name

    # -- loading -------------------------------------------------------------------------------
    def load(
        self,
        model_id: str,
        model_dir: str | Path,
        architecture: str | None = None,
        options: LoadOptions | None = None,
        *,
        admission: Admission | None = None,
    ) -> LoadOutcome:
        """Load (or join the load of) `model_id`. `admission(plan)` may raise before anything is
        built (the worker checks memory there).

        config.json is read and parsed once here; the options are normalized (dtype "auto" resolved,
        backend name checked) before they become part of the load's spec."""
        validate_model_id(model_id)
        options = options or LoadOptions()
        path = self.resolve_dir(model_dir)
        raw = read_config_json(path / "config.json")
        arch = architecture or self._architecture_of(raw, path)
        builder = self._require_builder(arch)
        config = ModelConfig.from_hf(raw, arch)
        device = torch.device(options.device) if options.device else self.device
        backend = options.attention_backend
        if self.attention_backends.names():
            backend = self.attention_backends.check_name(backend)
        if options.load_mode not in LOAD_MODES:
            raise InvalidArgument(f"load_mode {options.load_mode!r} is not one of {', '.join(LOAD_MODES)}")
        dtype = resolve_dtype(config, device, options.dtype, is_quantized_load(config, options))
        options = replace(
            options,
            dtype=dtype,
            cpu_gemm=resolve_cpu_gemm(options.cpu_gemm, device, dtype),
            attention_backend=backend,
            # Only CPU parameters can be views of a mapped file.
            load_mode=options.load_mode if device.type == "cpu" else "copy",
        )
        spec = LoadSpec(path, arch, options)
        with self._models_lock:
            existing = self._models.get(model_id)
            if existing is None:
                entry = ModelEntry(model_id, spec)
                self._models[model_id] = entry
            elif existing.spec != spec:
                raise ModelAlreadyExists(
                    f"model {model_id!r} is {existing.state.value.lower()} from {existing.spec.model_dir} "
                    f"({existing.spec.architecture}) with another spec; unload it first"
                )
            elif existing.state is ModelState.UNLOADING:
                raise ModelNotReady(f"model {model_id!r} is unloading; retry when it is gone")
        if existing is not None:
            existing.done.wait()
            if existing.error is not None:
                raise existing.error
            return LoadOutcome(existing, already_loaded=True, model=existing.model)
        model = self._build(entry, builder, admission, config, device)
        return LoadOutcome(entry, already_loaded=False, model=model)

    def _build(
        self,
        entry: ModelEntry,
        builder: ModelBuilder,
        admission: Admission | None,
        config: ModelConfig,
        device: torch.device,
    ) -> Model:
        spec = entry.spec
        started = time.perf_counter()
        try:
            plan = make_load_plan(
                spec.model_dir,
                spec.architecture,
                config,
                spec.options,
                device,
                self.attention_backends,
                parallel=self.parallel,
            )
            if admission is not None:
                admission(plan)
            if self._takes_plan.get(spec.architecture):
                model = builder(spec.model_dir, device, spec.options, plan=plan)  # type: ignore[call-arg]
            else:
                model = builder(spec.model_dir, device, spec.options)
        except BaseException as exc:
            # The builder's finished frames hold the half-built model (weights, caches), and the
            # exception outlives this call (entry.error, a cycle through this frame): drop their
            # locals now, not at the next garbage collection, so a failed load frees its memory.
            _clear_frames(exc)
            entry.error = exc
            with self._models_lock:
                if self._models.get(entry.model_id) is entry:
                    del self._models[entry.model_id]
            entry.done.set()
            release_cached_device_memory(device)
            raise
        entry.model = model
        entry.weights_source = spec.model_dir
        entry.load_seconds = time.perf_counter() - started
        entry.loaded_at = time.time()
        entry.state = ModelState.READY
        entry.done.set()
        return model

    def load_model_by_architecture(
        self,
        model_id: str,
        model_dir: str | Path,
        architecture: str,
        is_quant_model: bool = False,
        options: LoadOptions | None = None,
    ) -> ModelEntry:
        options = _with_quant(options, is_quant_model)
        return self.load(model_id, model_dir, architecture, options).entry

    def load_model_auto(
        self,
        model_id: str,
        model_dir: str | Path,
        is_quant_model: bool = False,
        options: LoadOptions | None = None,
    ) -> str:
        options = _with_quant(options, is_quant_model)
        return self.load(model_id, model_dir, None, options).entry.architecture

    # -- access --------------------------------------------------------------------------------
    def get_entry(self, model_id: str) -> ModelEntry:
        with self._models_lock:
            entry = self._models.get(model_id)
        if entry is None:
            raise ModelNotFound(f"model {model_id!r} is not loaded")
        return entry

    def get_model(self, model_id: str) -> Model:
        """The READY model (read access: config and metadata)."""
        entry = self.get_entry(model_id)
        if entry.state is not ModelState.READY or entry.model is None:
            raise ModelNotReady(f"model {model_id!r} is {entry.state.value.lower()}")
        return entry.model

    @contextlib.contextmanager
    def get_model_mut(
        self, model_id: str, timeout: float | None = None, *, allow_sleeping: bool = False
    ) -> Iterator[Model]:
        """Exclusive access to a READY model (or a SLEEPING one with allow_sleeping) for the block."""
        entry = self.get_entry(model_id)
        if not entry.lock.acquire(timeout=-1 if timeout is None else timeout):
            raise ModelNotReady(f"model {model_id!r} is busy")
        try:
            # Re-check under the lock: an unload may have completed while we waited.
            if entry.state is ModelState.SLEEPING and entry.model is not None and not allow_sleeping:
                raise ModelSleeping(
                    f"model {model_id!r} is sleeping (memory released by ReleaseMemory); call ResumeMemory first"
                )
            if entry.state not in (ModelState.READY, ModelState.SLEEPING) or entry.model is None:
                if entry.state is ModelState.LOADING:
                    raise ModelNotReady(f"model {model_id!r} is loading")
                raise ModelNotFound(f"model {model_id!r} is not loaded")
            yield entry.model
        finally:
            entry.lock.release()

    def list_models(self) -> list[ModelEntry]:
        with self._models_lock:
            return sorted(self._models.values(), key=lambda e: e.model_id)

    # -- unloading -----------------------------------------------------------------------------
    def unload_model(self, model_id: str) -> int:
        """Wait for a running load and for in-flight users, then free the model. Returns bytes freed."""
        validate_model_id(model_id)
        entry = self.get_entry(model_id)
        entry.done.wait()  # an Unload issued during a Load waits for it
        with self._models_lock:
            if self._models.get(model_id) is not entry or entry.state not in (
                ModelState.READY,
                ModelState.SLEEPING,
            ):
                raise ModelNotFound(f"model {model_id!r} is not loaded")
            entry.state = ModelState.UNLOADING
        with entry.lock:
            model, entry.model = entry.model, None
            try:
                freed = model.release() if model is not None else 0
            finally:
                # Even when release() fails the id must not stay UNLOADING forever: it could then
                # neither be used, nor unloaded again, nor loaded anew.
                with self._models_lock:
                    if self._models.get(model_id) is entry:
                        del self._models[model_id]
        return freed


def release_cached_device_memory(device: torch.device) -> None:
    """After a failed build, once the half-built model is dropped: the blocks it held sit free in
    torch's caching allocator, which the driver (and so admission, through mem_get_info) still
    counts as used; hand them back so that a retry fits."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _takes_plan(builder: ModelBuilder) -> bool:
    try:
        params = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # some callables (builtins, C extensions) have no signature
        return False
    return any(p.name == "plan" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _clear_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames of exc's traceback and of the errors it chains to."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        traceback.clear_frames(err.__traceback__)
        err = err.__cause__ or err.__context__


def _with_quant(options: LoadOptions | None, is_quant_model: bool) -> LoadOptions:
    options = options or LoadOptions()
    if options.is_quant_model == is_quant_model:
        return options
    return replace(options, is_quant_model=is_quant_model)
