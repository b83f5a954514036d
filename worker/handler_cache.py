"""Wrapped gRPC method handlers, built once per method instead of on every call.

An interceptor that wraps the handler it is given (metrics, the drain gate) would otherwise build a
new handler and closure per call. The handler beneath is the same object call after call; when it
changes (a refused call's handler is new), the wrapped form is rebuilt."""

from __future__ import annotations

from collections.abc import Callable

import grpc


class WrappedHandlers:
    """method -> (the handler given, `wrap(method, handler)`), rebuilt when the handler given changes."""

    def __init__(self, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
        self._wrap = wrap
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        cached = self._by_method.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._by_method[method] = (handler, self._wrap(method, handler))
        return cached[1]
