"""The one place where exceptions become gRPC status codes (DESIGN.md "Status codes").

Every servicer method is wrapped by `rpc_method`: registry/model errors map by their `kind`, out of
memory becomes RESOURCE_EXHAUSTED, and anything unexpected becomes INTERNAL with a request id — the
traceback goes to the log only. The wrapper also writes the log line of every failed call and of
every Load/Unload (method, model, code, duration, request id).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import torch

from registry.errors import ModelWorkerError

from .logs import LOGGER_NAME, fields

log = logging.getLogger(LOGGER_NAME + ".calls")

KIND_TO_CODE: dict[str, grpc.StatusCode] = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "internal": grpc.StatusCode.INTERNAL,
}

REQUEST_ID_KEY = "x-request-id"
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Methods whose successful calls are logged too (they change what the worker holds).
ALWAYS_LOGGED = frozenset(
    {
        "Load",
        "Unload",
        "UpdateWeights",
        "UpdateWeightsFromStream",
        "UpdateWeightsFromDistributed",
        "InitWeightsGroup",
        "DestroyWeightsGroup",
        "ReleaseMemory",
        "ResumeMemory",
    }
)

# Extra fields a servicer method adds to its call's log line (e.g. already_loaded, freed_bytes).
_call_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "call_fields", default=None
)


def note(**values: Any) -> None:
    """Attach fields to the current call's log line."""
    current = _call_fields.get()
    if current is not None:
        current.update(values)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    # torch's CPU allocator reports a refused allocation as a plain RuntimeError
    # ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes").
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def map_exception(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, client-visible message). INTERNAL's message is replaced by the caller."""
    if isinstance(exc, ModelWorkerError):
        return KIND_TO_CODE.get(exc.kind, grpc.StatusCode.INTERNAL), str(exc) or type(exc).__name__
    if is_out_of_memory(exc):
        return (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"out of memory: {str(exc).splitlines()[0] if str(exc) else ''}",
        )
    return grpc.StatusCode.INTERNAL, ""


# Longest status message sent (the log line keeps the whole one): a long list of weights must not
# push the trailers past the client's metadata limit (16 KB), which turns the code into RESOURCE_EXHAUSTED.
MAX_STATUS_MESSAGE_CHARS = 1024


def cap_message(message: str, limit: int = MAX_STATUS_MESSAGE_CHARS) -> str:
    """`message` cut to about `limit` characters at a list separator, saying how many items are left."""
    if len(message) <= limit:
        return message
    head = message[: limit - 80]
    cut = max(head.rfind(", "), head.rfind("; "))
    if cut > limit // 2:
        head = head[:cut]
    rest = message[len(head) :]
    items = rest.count(", ") + rest.count("; ")
    what = f"{items} more" if items else f"{len(rest)} more characters"
    return f"{head} ... and {what} (the worker log has the whole message)"


def request_id_of(context: grpc.aio.ServicerContext | None) -> str:
    """The client's x-request-id when it sent a sane one, else a fresh id."""
    if context is not None:
        for key, value in context.invocation_metadata() or ():
            if key == REQUEST_ID_KEY and isinstance(value, str) and _CLIENT_REQUEST_ID.fullmatch(value):
                return value
    return os.urandom(8).hex()  # 16 hex digits, without building a UUID object per call


def log_call(
    method: str,
    code: grpc.StatusCode,
    seconds: float,
    request_id: str,
    model: str = "",
    message: str = "",
    exc_info: BaseException | None = None,
    **extra: Any,
) -> None:
    ok = code is grpc.StatusCode.OK
    log.log(
        log_level_of(code),
        "%s %s",
        method,
        "ok" if ok else "failed",
        exc_info=exc_info,
        extra=fields(
            method=method,
            model=model or None,
            code=code.name,
            duration_s=round(seconds, 6),
            request_id=request_id,
            error=message or None,
            **extra,
        ),
    )


# A failed call is the client's problem (WARNING) unless the worker failed (ERROR); OK and a call the
# client cancelled are routine (INFO).
_ERROR_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})
_INFO_CODES = frozenset({grpc.StatusCode.OK, grpc.StatusCode.CANCELLED})


def log_level_of(code: grpc.StatusCode) -> int:
    if code in _INFO_CODES:
        return logging.INFO
    return logging.ERROR if code in _ERROR_CODES else logging.WARNING


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def rpc_method(name: str) -> Callable[[Handler], Handler]:
    """Wrap a servicer coroutine: map its exceptions to a status and log the call."""

    def decorate(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id = request_id_of(context)
            started = time.perf_counter()
            model = getattr(request, "model_id", "")
            extra: dict[str, Any] = {}
            token = _call_fields.set(extra)
            try:
                response = await fn(self, request, context)
            except asyncio.CancelledError:
                # Client cancelled or its deadline passed; the model work (if any) finishes on its own.
                log_call(
                    name, grpc.StatusCode.CANCELLED, time.perf_counter() - started, request_id, model, **extra
                )
                raise
            except Exception as exc:
                code, message = map_exception(exc)
                internal = code is grpc.StatusCode.INTERNAL
                if internal:
                    message = f"internal error (request id {request_id}); the worker log has the details"
                log_call(
                    name,
                    code,
                    time.perf_counter() - started,
                    request_id,
                    model,
                    message if not internal else f"{type(exc).__name__}: {exc}",
                    exc_info=exc if internal else None,
                    **extra,
                )
                context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
                await context.abort(code, cap_message(message))
            finally:
                _call_fields.reset(token)
            if name in ALWAYS_LOGGED:
                log_call(name, grpc.StatusCode.OK, time.perf_counter() - started, request_id, model, **extra)
            return response

        return wrapper

    return decorate
