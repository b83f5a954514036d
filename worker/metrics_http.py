"""The `/metrics` HTTP endpoint with a bounded number of threads.

prometheus_client's own server starts a thread per connection, so idle or half-open connections
(a port scanner, a stuck scraper) each hold a thread for ever. Here a fixed pool of
`METRICS_THREADS` serves connections, and a connection that sends nothing for
`METRICS_IDLE_SECONDS` is closed; connections beyond what the pool is serving wait in its queue.
"""

from __future__ import annotations

import queue
import socket
import threading
from socketserver import BaseServer
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

METRICS_THREADS = 4
METRICS_IDLE_SECONDS = 10.0


class _QuietHandler(WSGIRequestHandler):
    timeout = METRICS_IDLE_SECONDS  # socket timeout: an idle connection ends its handler

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's signature
        """Scrapes are not worth a log line each."""


class BoundedWSGIServer(WSGIServer):
    """A WSGI server whose connections are served by METRICS_THREADS daemon threads (daemon, so
    that an idle connection never holds up the process's exit)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: queue.SimpleQueue[tuple[socket.socket, Any] | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"metrics-http-{i}", daemon=True)
            for i in range(METRICS_THREADS)
        ]
        for worker in self._workers:
            worker.start()

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        self._queue.put((request, client_address))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            request, client_address = item
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def server_close(self) -> None:
        super().server_close()
        for _ in getattr(self, "_workers", ()):  # none when the bind failed in __init__
            self._queue.put(None)


def start_metrics_http(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[BaseServer, threading.Thread]:
    """Serve `registry` on host:port from a daemon accept thread; returns (server, thread)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]

    class Server(BoundedWSGIServer):
        address_family = family

    httpd = make_server(sockaddr[0], port, make_wsgi_app(registry), Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-accept", daemon=True)
    thread.start()
    return httpd, thread


__all__ = ["METRICS_IDLE_SECONDS", "METRICS_THREADS", "start_metrics_http"]
