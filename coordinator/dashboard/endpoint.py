"""DashboardEndpoint: the read-only web dashboard on its own port, served by stdlib `http.server` in daemon threads.

GET only (any other method: 405):

    /                       the page; its script and style under /static/ (package data, no CDN, no build step)
    /api/jobs               the newest jobs, with state and progress
    /api/jobs/ID            one job: every round's state, selected and reporting silos, timings; the injections and
                            the evaluator's scores
    /api/jobs/ID/metrics    its metric rows per round, task and silo, and its per-task table (`fedmeki job report`)
    /api/silos              the silos and their last contact

Errors are JSON, `{"error": message}`: 401 and 403 (credentials), 404 (no such page or job), 503 (the database
cannot be read), 500 with a reference to the log for anything else.

With the coordinator's kit the port speaks HTTPS with the coordinator's certificate and asks for a client
certificate of the project CA (another CA's fails the handshake); every request then passes the same
`AccessControl` as a JobService call: a researcher or admin certificate, not revoked, checked against the
database each time, each refusal audited. Without a kit it is plain HTTP and open to anyone, as JobService is.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from cryptography import x509
from sqlalchemy.exc import SQLAlchemyError

from coordinator.access import AccessControl
from coordinator.credentials import PeerCredentials
from coordinator.dashboard import documents
from coordinator.store.database import Database
from fedmeki_core.errors import (
    AuthenticationError,
    FedmekiError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
)
from fedmeki_core.kits import CERT_FILE, KEY_FILE, Kit
from fedmeki_core.metrics_endpoint import split_address, stop_serving

logger = logging.getLogger(__name__)

HTTP_STATUS_BY_ERROR: dict[type[FedmekiError], int] = {
    InvalidInputError: 400,
    AuthenticationError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    UnavailableError: 503,
}

# The files the page is made of, by the path that serves them.
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_JOB_PATH = re.compile(r"/api/jobs/([^/]+)(/metrics)?")
_JSON = "application/json"
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}
_HANDSHAKE_SECONDS = 10.0
_IDLE_SECONDS = 15.0  # a kept-alive connection's thread ends after this long without a request

Answer = tuple[int, bytes, str]


class DashboardEndpoint:
    def __init__(
        self,
        address: str,
        database: Database,
        access: AccessControl,
        liveness_seconds: float,
        clock: Callable[[], datetime],
        kit: Kit | None = None,
    ) -> None:
        self._host, self._port = split_address(address)
        self._database = database
        self._access = access
        self._liveness = liveness_seconds
        self._clock = clock
        self._tls = _server_context(kit) if kit is not None else None
        folder = resources.files("coordinator.dashboard") / "static"
        self._static = {path: ((folder / name).read_bytes(), kind) for path, (name, kind) in _STATIC.items()}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "http" if self._tls is None else "https"

    def start(self) -> int:
        """Bind and serve; returns the port (a free one when the address asks for port 0)."""
        try:
            server = _Server((self._host, self._port), _Handler, self, self._tls)
        except OSError as exc:
            raise UnavailableError(f"cannot listen on {self._host}:{self._port} (dashboard_address): {exc}") from None
        self._thread = threading.Thread(target=server.serve_forever, name="fedmeki-dashboard", daemon=True)
        self._thread.start()
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            stop_serving(self._server, self._thread)
            self._server = self._thread = None

    def answer(self, target: str, call: PeerCredentials) -> Answer:
        """The status, body and content type for a GET of `target` by `call`."""
        path = urlsplit(target).path
        try:
            self._access.reader(call, "Dashboard")
            if path in self._static:
                return (200, *self._static[path])
            return 200, _json(self._document(path)), _JSON
        except FedmekiError as exc:
            return _error(_http_status(exc), exc.message)
        except SQLAlchemyError:
            logger.warning("dashboard: cannot read the database", exc_info=True)
            return _error(503, "the coordinator's database is unavailable; try again shortly")
        except Exception:
            reference = uuid.uuid4().hex[:12]
            logger.exception("dashboard: internal error (ref %s)", reference)
            return _error(500, f"internal error (ref {reference}); see the coordinator log")

    def _document(self, path: str) -> documents.Document:
        if path == "/api/jobs":
            return documents.jobs(self._database)
        if path == "/api/silos":
            return documents.silos(self._database, self._liveness, self._clock())
        if (match := _JOB_PATH.fullmatch(path)) is not None:
            read = documents.metrics if match.group(2) else documents.job
            return read(self._database, unquote(match.group(1)))
        raise NotFoundError(f"no page {path!r}; there are /, /api/jobs, /api/jobs/ID, /api/jobs/ID/metrics, /api/silos")


def _server_context(kit: Kit) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(kit.path / CERT_FILE, kit.path / KEY_FILE)
    context.load_verify_locations(cadata=kit.ca_pem.decode())
    # Optional rather than required: a browser without a certificate then gets a 401 saying what it lacks instead
    # of a bare handshake failure. A certificate the project CA did not sign still fails the handshake.
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _http_status(error: FedmekiError) -> int:
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS_BY_ERROR:
            return HTTP_STATUS_BY_ERROR[cls]
    return 500


def _json(document: documents.Document) -> bytes:
    return json.dumps(document, allow_nan=False).encode()


def _error(status: int, message: str) -> Answer:
    return status, _json({"error": message}), _JSON


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        dashboard: DashboardEndpoint,
        tls: ssl.SSLContext | None,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.dashboard = dashboard
        self.tls = tls

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A browser that leaves mid-response (a closed tab) is routine: no traceback on stderr.
        logger.debug("dashboard: the connection from %s ended early", client_address[0], exc_info=True)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Runs in the connection's own thread: the TLS handshake happens here, so a slow one blocks no other."""
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(_HANDSHAKE_SECONDS)
        try:
            secured = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            logger.info("dashboard: TLS handshake with %s refused: %s", client_address[0], exc)
            return
        try:
            super().finish_request(secured, client_address)
        finally:
            secured.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a polling page reuses its connection (and its TLS session)
    server_version = "fedmeki-dashboard"
    sys_version = ""
    timeout = _IDLE_SECONDS

    def do_GET(self) -> None:
        server = cast(_Server, self.server)
        self._send(*server.dashboard.answer(self.path, self._credentials()))

    def __getattr__(self, name: str) -> Any:
        # http.server looks up do_<METHOD> for each request; every method but GET gets the same 405.
        if name.startswith("do_"):
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.close_connection = True  # the request may carry a body this does not read
        self._send(*_error(405, f"{self.command} is not allowed: the dashboard is read-only (GET)"), allow=True)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line, oversized headers) as JSON like every other."""
        self.close_connection = True
        self._send(*_error(code, message or HTTPStatus(code).phrase))

    def _credentials(self) -> PeerCredentials:
        certificate = None
        if isinstance(self.connection, ssl.SSLSocket):
            der = self.connection.getpeercert(binary_form=True)
            certificate = x509.load_der_x509_certificate(der) if der else None
        host, port = self.client_address[:2]
        return PeerCredentials(peer=f"{host}:{port}", metadata=(), certificate=certificate)

    def _send(self, status: int, body: bytes, content_type: str, allow: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _HEADERS.items():
            self.send_header(name, value)
        if allow:
            self.send_header("Allow", "GET")
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard %s: " + format, self.address_string(), *args)
