"""Typed errors of the registry and the models.

Each class names a category (`kind`) that the worker maps to one gRPC status code in one place;
nothing here knows about protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable


class ModelWorkerError(Exception):
    """Base of every error a caller can cause or meet; `kind` selects the status code."""

    kind = "internal"


class InvalidArgument(ModelWorkerError):
    """The request or the model directory is malformed (INVALID_ARGUMENT)."""

    kind = "invalid_argument"


class UnknownArchitecture(InvalidArgument):
    pass


class InvalidConfig(InvalidArgument):
    """config.json is missing, unreadable, or holds a value we cannot serve."""


class WeightsMismatch(InvalidArgument):
    """Missing, unexpected or mis-shaped weights; the message lists every one."""

    def __init__(
        self,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[str] = (),
        where: str = "",
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} weight(s): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} weight(s): {', '.join(self.unexpected)}")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} shape mismatch(es): {'; '.join(self.mismatched)}")
        prefix = f"checkpoint {where}: " if where else "checkpoint: "
        super().__init__(prefix + "; ".join(parts))


class UnsafeCheckpoint(InvalidArgument):
    """Pickle-based checkpoints (.bin/.pt/.pth) are refused: loading them can run code."""


class CorruptCheckpoint(InvalidArgument):
    """A safetensors file is truncated or its header is inconsistent."""


class InvalidRequest(InvalidArgument):
    """A forward call's arguments disagree (lengths, ranges, shapes)."""


class NotFound(ModelWorkerError):
    kind = "not_found"


class ModelNotFound(NotFound):
    pass


class ModelDirNotFound(NotFound):
    pass


class ModelAlreadyExists(ModelWorkerError):
    """The id is loaded (or loading) with another spec."""

    kind = "already_exists"


class PermissionDenied(ModelWorkerError):
    """A path outside the configured model roots."""

    kind = "permission_denied"


class OutOfResources(ModelWorkerError):
    """Out of device memory, KV capacity, or over a request size cap (RESOURCE_EXHAUSTED)."""

    kind = "resource_exhausted"


class ModelNotReady(ModelWorkerError):
    """The model is LOADING or UNLOADING; retry later (UNAVAILABLE)."""

    kind = "unavailable"


class FailedPrecondition(ModelWorkerError):
    """The call is well-formed but the worker's state refuses it (FAILED_PRECONDITION)."""

    kind = "failed_precondition"


class IncompatibleLayout(FailedPrecondition):
    """Imported KV blocks come from a cache of another shape or dtype (model, block size, dtype)."""


class ModelSleeping(FailedPrecondition):
    """The model's weights or KV cache are released (ReleaseMemory); ResumeMemory first."""
