"""BackendRegistry: attention backend name → lazy factory, availability probe and `auto` priority.

The registry only knows names and callables (which backends exist is the architectures' business:
`architectures.backends.register_builtin_backends`). The worker asks it to validate a Load's
`attention_backend` and to list the backends for Info; a Load's plan resolves `auto` through it.
Registering one more backend is one call:

    backends.register("triton", factory=TritonBackend, probe=triton_unavailable_reason, priority=50)

A backend may also prefer a KV block size (`block_size=`): a Load that names none gets the preference
of the backend it would run (flash_attn: 256, its paged cache needs a multiple of 256), else the
cache plan's small default (`preferred_block_size`).

A factory is called only when its backend is selected, so importing a backend's package (flash_attn,
triton) happens then, never at start-up. A probe answers None when the backend can run with the
given requirements, else a sentence saying why not; it must not import heavy packages before the
cheap checks (device type, dtype) have passed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

import torch

from .errors import InvalidArgument

AUTO = "auto"
B = TypeVar("B")


@dataclass(frozen=True)
class BackendRequirements:
    """What a model asks of its attention backend. None: not decided yet (Info asks "could it run on
    this device at all?"); a probe skips the checks it cannot make."""

    device: torch.device
    dtype: torch.dtype | None = None
    block_size: int | None = None
    head_dim: int | None = None


Probe = Callable[[BackendRequirements], "str | None"]


def always_available(requirements: BackendRequirements) -> str | None:
    return None


@dataclass(frozen=True)
class BackendEntry(Generic[B]):
    name: str
    factory: Callable[[], B]
    probe: Probe
    priority: int  # `auto` takes the available backend with the highest priority
    # Where `auto` may pick it (default: wherever it can run); a backend that runs somewhere only as a
    # test mode (triton on the CPU under its interpreter) is named explicitly there, never picked.
    auto_probe: Probe | None = None
    # The KV block size a Load that names none gets when this backend runs it; None: no preference.
    block_size: int | None = None

    def auto_reason(self, requirements: BackendRequirements) -> str | None:
        return (self.auto_probe or self.probe)(requirements)


class BackendRegistry(Generic[B]):
    def __init__(self) -> None:
        self._entries: dict[str, BackendEntry[B]] = {}
        self._lock = threading.Lock()

    def register(
        self,
        name: str,
        factory: Callable[[], B],
        probe: Probe = always_available,
        *,
        priority: int = 0,
        auto_probe: Probe | None = None,
        block_size: int | None = None,
    ) -> None:
        key = name.strip().lower() if isinstance(name, str) else ""
        if not key or key == AUTO:
            raise InvalidArgument(f"attention backend name {name!r} must be a non-empty name other than auto")
        if not callable(factory) or not callable(probe):
            raise InvalidArgument(f"attention backend {key}: factory and probe must be callable")
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
        ):
            raise InvalidArgument(f"attention backend {key}: block_size must be a positive integer or None")
        with self._lock:
            self._entries[key] = BackendEntry(key, factory, probe, priority, auto_probe, block_size)

    def names(self) -> tuple[str, ...]:
        """Registered backends, in registration order (without `auto`)."""
        with self._lock:
            return tuple(self._entries)

    def check_name(self, name: str) -> str:
        """The normalized name ("" → auto); InvalidArgument listing the valid names otherwise."""
        key = (name or AUTO).strip().lower()
        if key != AUTO and key not in self.names():
            valid = ", ".join((AUTO, *self.names()))
            raise InvalidArgument(f"attention_backend {name!r} is not known (valid: {valid})")
        return key

    def unavailable_reason(self, name: str, requirements: BackendRequirements) -> str | None:
        return self._entry(name).probe(requirements)

    def resolve(self, name: str, requirements: BackendRequirements) -> str:
        """The backend a model gets: a named one that can run (else InvalidArgument saying why), or
        for `auto` the available one of highest priority (never fails while any backend can run)."""
        key = self.check_name(name)
        if key != AUTO:
            reason = self.unavailable_reason(key, requirements)
            if reason is not None:
                raise InvalidArgument(f"attention_backend {key} cannot run: {reason}")
            return key
        with self._lock:
            ranked = sorted(self._entries.values(), key=lambda e: -e.priority)
        for entry in ranked:
            if entry.auto_reason(requirements) is None:
                return entry.name
        raise InvalidArgument(f"no attention backend can run on {requirements.device}")

    def preferred_block_size(self, name: str, requirements: BackendRequirements) -> int | None:
        """The block size preferred by the backend `name` would get with the block size left open
        (`requirements.block_size` is ignored): a named backend's own, even where it cannot run (its
        probe then says why, not a block size it never asked for); for `auto`, the preference of the
        backend `auto` would pick. None: no preference (or no backend can run)."""
        key = self.check_name(name)
        if key == AUTO:
            try:
                key = self.resolve(AUTO, replace(requirements, block_size=None))
            except InvalidArgument:
                return None
        return self._entry(key).block_size

    def create(self, name: str) -> B:
        return self._entry(name).factory()

    def select(self, name: str, requirements: BackendRequirements) -> B:
        return self.create(self.resolve(name, requirements))

    def available(self, *devices: torch.device) -> list[str]:
        """Backends that could serve on any of `devices` (for Info); dtype and block size are per model."""
        return [
            name
            for name in self.names()
            if any(
                self._entry(name).auto_reason(BackendRequirements(torch.device(d))) is None for d in devices
            )
        ]

    def _entry(self, name: str) -> BackendEntry[B]:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            self.check_name(name)  # raises, listing the valid names
            raise InvalidArgument(f"attention_backend {name!r} names no backend")  # only `auto` gets here
        return entry
