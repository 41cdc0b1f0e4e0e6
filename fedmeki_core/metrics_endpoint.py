"""MetricsEndpoint: a process's Prometheus registry served over plain HTTP on its own port, in a daemon thread."""

from __future__ import annotations

import threading
from socketserver import BaseServer
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from fedmeki_core.errors import InvalidInputError, UnavailableError


def split_address(address: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:9090` for IPv6) as (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidInputError(f"address {address!r}: expected HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def stop_serving(server: BaseServer, thread: threading.Thread) -> None:
    """Stop a server running `serve_forever` in `thread`, close its socket and wait for the thread."""
    server.shutdown()
    server.server_close()
    thread.join()


class MetricsEndpoint:
    """`GET /metrics` (any path, in fact) answers the registry's samples in the Prometheus text format.

    Unauthenticated, like most exporters: bind it to loopback or to a network only the monitoring system reaches.
    """

    def __init__(self, registry: CollectorRegistry, address: str) -> None:
        self._registry = registry
        self._host, self._port = split_address(address)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve; returns the port (a free one when the address asks for port 0)."""
        try:
            self._server, self._thread = start_http_server(self._port, self._host, self._registry)
        except OSError as exc:  # taken, or not an address of this host: say which setting, not a traceback
            raise UnavailableError(f"cannot listen on {self._host}:{self._port} (metrics_address): {exc}") from None
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            stop_serving(self._server, self._thread)
            self._server = self._thread = None
