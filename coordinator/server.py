"""Wires the coordinator together: database, scheduler, both servicers, health, reflection, the optional metrics
and dashboard ports; start and stop.

The gRPC server is gRPC's asyncio server, run on one event loop in a thread the coordinator owns: a call waiting for
its client (a long poll, a watch, a stream) is a coroutine, not a thread. Blocking work goes to `Offload`'s bounded
pool. `start()` and `stop()` stay synchronous: they hand their work to the loop and wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.access import AccessControl
from coordinator.artifacts import Artifacts
from coordinator.audit import AuditLog
from coordinator.certificates import CertificateAuthenticator
from coordinator.credentials import Authenticator, TokenAuthenticator
from coordinator.dashboard import DashboardEndpoint
from coordinator.events import EventBus
from coordinator.instance import InstanceLock, require_closed_plaintext
from coordinator.jobs_api import JobServicer
from coordinator.metrics import CoordinatorMetrics
from coordinator.offload import Offload
from coordinator.pacing import CallSlots
from coordinator.scheduler import Clock, Scheduler
from coordinator.settings import CoordinatorSettings
from coordinator.silo_api import SiloServicer
from coordinator.silos import SiloRegistry
from coordinator.store.database import Database
from coordinator.store.models import utcnow
from fedmeki_core.errors import UnavailableError
from fedmeki_core.files import private_dirs
from fedmeki_core.kits import Kit, Role, load_kit
from fedmeki_core.metrics_endpoint import MetricsEndpoint
from fedmeki_core.proto.v1 import jobs_pb2, jobs_pb2_grpc, silo_pb2, silo_pb2_grpc
from fedmeki_core.transport_options import server_window_options

logger = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAMES = (
    jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name,
    silo_pb2.DESCRIPTOR.services_by_name["SiloService"].full_name,
)


class Coordinator:
    """A running coordinator. `start()` migrates the database, resumes jobs and binds the port.

    With a startup kit (`settings.kit`) the port speaks mTLS only: every client must present a certificate of
    the project CA, and identities come from it (`CertificateAuthenticator`); without one, plaintext. The
    dashboard (`settings.dashboard_address`) asks the same `AccessControl` as JobService.
    """

    def __init__(self, settings: CoordinatorSettings, clock: Clock = utcnow) -> None:
        self.settings = settings
        private_dirs(settings.data_dir)
        self.database = Database(settings.database_url)
        self._instance = InstanceLock(settings.data_dir, self.database)
        self.artifacts = Artifacts(settings.data_dir.resolve(), settings.spool_pool_files)
        self.events = EventBus()
        self.registry = SiloRegistry(self.database, settings.enrollment_token_ttl)
        self.slots = CallSlots.of(
            settings.max_concurrent_uploads,
            settings.max_concurrent_submissions,
            settings.max_concurrent_watches,
            settings.max_concurrent_polls,
        )
        self.audit = AuditLog(
            self.database, settings.audit_retention_days, settings.audit_anonymous_refusals_per_minute
        )
        self.kit: Kit | None = load_kit(settings.kit, Role.COORDINATOR) if settings.kit else None
        authenticator: Authenticator = (
            CertificateAuthenticator(self.database)
            if self.kit
            else TokenAuthenticator(self.database, settings.credential_cache_seconds)
        )
        self.access = AccessControl(authenticator, self.audit)
        self.metrics = CoordinatorMetrics(self.database, settings.silo_liveness_seconds, clock)
        self.offload = Offload(settings.blocking_workers)
        self.scheduler = Scheduler(
            self.database, self.artifacts, self.events, settings.scheduler, self.metrics, self.offload, clock
        )
        self._health = health.aio.HealthServicer()
        self._loop: asyncio.AbstractEventLoop | None = None  # the servers' event loop, in its own thread once started
        self._loop_thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_endpoint = (
            MetricsEndpoint(self.metrics.registry, settings.metrics_address) if settings.metrics_address else None
        )
        self._dashboard = (
            DashboardEndpoint(
                settings.dashboard_address,
                self.database,
                self.access,
                settings.silo_liveness_seconds,
                clock,
                self.kit,
            )
            if settings.dashboard_address
            else None
        )
        self._health_server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port: int | None = None  # with a metrics endpoint, once started
        self.health_port: int | None = None  # with settings.health_address, once started
        self.dashboard_port: int | None = None  # with settings.dashboard_address, once started

    def start(self) -> int:
        require_closed_plaintext(self.settings)  # before anything is bound or touched
        self._instance.acquire()  # one coordinator per data directory and database, before any tidying
        try:
            return self._start()
        except BaseException:
            self._instance.release()
            raise

    def _start(self) -> int:
        self.database.migrate()
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._loop_thread = threading.Thread(target=loop.run_forever, name="fedmeki-grpc", daemon=True)
        self._loop_thread.start()
        try:
            return self._serve()
        except BaseException:
            self._close_loop()
            raise

    def _serve(self) -> int:
        server, port = self._on_loop(self._bound_server())
        self._server = server  # stopped by _close_loop should the start fail from here
        # The HTTP ports before the scheduler starts: a port in use then leaves nothing running.
        if self._metrics_endpoint is not None:
            self.metrics_port = self._metrics_endpoint.start()
            logger.info("Prometheus metrics on %s, port %d", self.settings.metrics_address, self.metrics_port)
        if self._dashboard is not None:
            self.dashboard_port = self._dashboard.start()
            logger.info(
                "dashboard on %s://%s (port %d)",
                self._dashboard.scheme,
                self.settings.dashboard_address,
                self.dashboard_port,
            )
        self.scheduler.start()
        self._on_loop(self._started(server))
        self.port = port
        if self.settings.health_address:
            self._health_server, self.health_port = self._on_loop(self._health_only(self.settings.health_address))
        logger.info(
            "coordinator serving on port %d, %s (database %s, data %s)",
            self.port,
            f"mTLS with the kit in {self.kit.path}" if self.kit else "plaintext",
            self.database.engine.url.render_as_string(hide_password=True),
            self.artifacts.root,
        )
        return self.port

    async def _bound_server(self) -> tuple[grpc.aio.Server, int]:
        options = [
            ("grpc.max_receive_message_length", self.settings.max_message_bytes),
            ("grpc.max_send_message_length", self.settings.max_message_bytes),
            *server_window_options(self.settings.stream_window_bytes),  # fills a WAN link at bounded memory
            ("grpc.so_reuseport", 0),  # a second server on a bound port must fail, not share it
            ("grpc.keepalive_time_ms", int(self.settings.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.settings.keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),  # an upload sends the client nothing: ping it all the same
            ("grpc.http2.ping_timeout_ms", int(self.settings.keepalive_timeout_seconds * 1000)),
            (
                "grpc.http2.min_recv_ping_interval_without_data_ms",
                int(self.settings.keepalive_min_client_seconds * 1000),
            ),
        ]
        server = grpc.aio.server(
            interceptors=[self.metrics.interceptor],
            options=options,
            maximum_concurrent_rpcs=self.settings.maximum_concurrent_rpcs,
        )
        jobs_pb2_grpc.add_JobServiceServicer_to_server(
            JobServicer(
                self.scheduler,
                self.database,
                self.artifacts,
                self.events,
                self.settings,
                self.access,
                self.audit,
                self.slots,
                self.offload,
            ),
            server,
        )
        silo_pb2_grpc.add_SiloServiceServicer_to_server(
            SiloServicer(
                self.scheduler,
                self.registry,
                self.access,
                self.audit,
                self.artifacts,
                self.settings,
                self.slots,
                self.offload,
            ),
            server,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server, _bind(server, self.settings.address, self.kit)

    async def _started(self, server: grpc.aio.Server) -> None:
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def _health_only(self, address: str) -> tuple[grpc.aio.Server, int]:
        """`grpc.health.v1.Health` alone, in plaintext: for probes that cannot present a client certificate
        (Kubernetes' gRPC probes, container health checks). It tells SERVING or not, and nothing else."""
        server = grpc.aio.server(
            options=[*server_window_options(self.settings.stream_window_bytes), ("grpc.so_reuseport", 0)],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        port = _bind(server, address, None, "health_address")
        await server.start()
        logger.info("health service alone, plaintext, on %s (port %d)", address, port)
        return server, port

    def stop(self, grace: float | None = None) -> None:
        """Stop taking calls, let running ones finish for `grace` seconds, then stop the scheduler."""
        if self._loop is not None:
            self._on_loop(self._health.enter_graceful_shutdown())
        if self._dashboard is not None:
            self._dashboard.stop()
        if self._server is not None:
            self._on_loop(self._server.stop(self.settings.grace_seconds if grace is None else grace))
        self.scheduler.stop()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.stop()
        self._close_loop()
        self._instance.release()
        self.database.dispose()

    def _on_loop(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the servers' event loop and wait for its result, from any other thread."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def _close_loop(self) -> None:
        """End what still runs on the loop (calls cut by the stop), stop it, and the blocking pool after it."""
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        for server in (self._server, self._health_server):  # stopped already, or bound by a start that failed
            if server is not None:
                self._on_loop(server.stop(0))
        self._on_loop(_cancel_the_rest())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self._loop = self._loop_thread = None
        self._server = self._health_server = None
        self.offload.shutdown()


async def _cancel_the_rest() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _bind(server: grpc.aio.Server, address: str, kit: Kit | None, setting: str = "address") -> int:
    """Bind `address` (mTLS with `kit`); a port in use or an address not here is one clear UnavailableError."""
    try:
        if kit is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(kit.key_pem, kit.cert_pem)], root_certificates=kit.ca_pem, require_client_auth=True
            )
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc: "Failed to bind to address ..."
        port = 0
    if port == 0:
        raise UnavailableError(f"cannot listen on {address} ({setting}): the port is in use or the address is not here")
    return int(port)
