"""CoordinatorMetrics: what the coordinator tells Prometheus, in one registry per coordinator.

RPC outcomes by status code and the bytes and durations of model transfers come from a server interceptor;
the aggregation time from the scheduler; jobs, rounds and silos are read from the database at each scrape, so
they are right after a restart and never drift from the truth. Served on `metrics_address` when it is set.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from coordinator.store.database import Database
from coordinator.store.models import Job, Round, Silo
from fedmeki_core.records import JobState, RoundState

logger = logging.getLogger(__name__)

# The RPCs that carry model bytes as `chunk` payloads, and which way they go.
TRANSFERS = {
    "/fedmeki.v1.SiloService/UploadUpdate": "upload",
    "/fedmeki.v1.JobService/SubmitJob": "upload",
    "/fedmeki.v1.SiloService/DownloadModel": "download",
    "/fedmeki.v1.JobService/DownloadCheckpoint": "download",
}
_TRANSFER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_AGGREGATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class CoordinatorMetrics:
    def __init__(self, database: Database, liveness_seconds: float, clock: Callable[[], datetime]) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "fedmeki_rpc_handled",
            "RPCs finished, by service, method and gRPC status code",
            ["service", "method", "code"],
            registry=self.registry,
        )
        self.transfer_bytes = Counter(
            "fedmeki_transfer_bytes",
            "Model bytes received (upload) or sent (download), counted chunk by chunk",
            ["method", "direction"],
            registry=self.registry,
        )
        self.transfer_seconds = Histogram(
            "fedmeki_transfer_seconds",
            "Duration of the RPCs that move model bytes, whatever their outcome",
            ["method"],
            buckets=_TRANSFER_BUCKETS,
            registry=self.registry,
        )
        self.aggregation_seconds = Histogram(
            "fedmeki_aggregation_seconds",
            "Closing a round: last folds, server step, checkpoint write and commit",
            buckets=_AGGREGATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StoreCollector(database, liveness_seconds, clock))
        self.interceptor = _MetricsInterceptor(self)


class _StoreCollector(Collector):
    """Jobs and rounds by state, silos registered and connected, each silo's last contact: one read per scrape."""

    def __init__(self, database: Database, liveness_seconds: float, clock: Callable[[], datetime]) -> None:
        self._db = database
        self._liveness = liveness_seconds
        self._now = clock

    def collect(self) -> Iterable[Metric]:
        try:
            with self._db.read() as session:
                jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
                rounds = dict(session.execute(select(Round.state, func.count()).group_by(Round.state)).all())
                silos = session.execute(select(Silo.name, Silo.role, Silo.revoked, Silo.last_seen_at)).all()
        except SQLAlchemyError:  # the endpoint still answers the in-memory metrics
            logger.warning("metrics: cannot read the database", exc_info=True)
            return
        job_family = GaugeMetricFamily("fedmeki_jobs", "Jobs by state", labels=["state"])
        for job_state in JobState:
            job_family.add_metric([job_state.value], jobs.get(job_state.value, 0))
        round_family = GaugeMetricFamily("fedmeki_rounds", "Rounds of all jobs by state", labels=["state"])
        for round_state in RoundState:
            round_family.add_metric([round_state.value], rounds.get(round_state.value, 0))
        registered = GaugeMetricFamily("fedmeki_silos_registered", "Silos registered, not revoked", labels=["role"])
        connected = GaugeMetricFamily(
            "fedmeki_silos_connected", "Silos that called within silo_liveness_seconds", labels=["role"]
        )
        last_seen = GaugeMetricFamily(
            "fedmeki_silo_last_seen_timestamp_seconds", "Each silo's last call (Unix time)", labels=["silo"]
        )
        now = self._now()
        counts: dict[str, list[int]] = {"trainer": [0, 0], "injector": [0, 0]}
        for name, role, revoked, seen in silos:
            if seen is not None:
                last_seen.add_metric([name], seen.timestamp())
            if revoked:
                continue
            count = counts.setdefault(role, [0, 0])
            count[0] += 1
            count[1] += seen is not None and (now - seen).total_seconds() <= self._liveness
        for role, (all_silos, live) in sorted(counts.items()):
            registered.add_metric([role], all_silos)
            connected.add_metric([role], live)
        yield from (job_family, round_family, registered, connected, last_seen)


class _MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every RPC's outcome and, for the transfer RPCs, their bytes (as they pass) and duration."""

    def __init__(self, metrics: CoordinatorMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = str(details.method)
        kind = (handler.request_streaming, handler.response_streaming)
        behavior = {
            (False, False): handler.unary_unary,
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[kind]
        wrap = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return wrap(
            self._observed(behavior, method, *kind),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _observed(self, behavior: Callable[..., Any], method: str, streams_in: bool, streams_out: bool) -> Any:
        direction = TRANSFERS.get(method)
        counted = self._metrics.transfer_bytes.labels(method.rsplit("/", 1)[1], direction) if direction else None

        def requests(request: Any) -> Any:
            if counted is None or not streams_in:
                return request
            return _counted(request, counted)

        if not streams_out or not inspect.isasyncgenfunction(behavior):  # one response, or context.write (health)

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                with self._outcome(method, context):
                    return await behavior(requests(request), context)

            return unary

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            with self._outcome(method, context):
                async for response in behavior(requests(request), context):
                    yield response if counted is None else _counting(response, counted)

        return stream

    @contextmanager
    def _outcome(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            yield
        except (GeneratorExit, asyncio.CancelledError):  # the client went away in the middle of the call
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = context.code() or grpc.StatusCode.UNKNOWN  # `abort` sets the code before it raises
            raise
        finally:
            service, name = method.strip("/").rsplit("/", 1)
            self._metrics.rpcs.labels(service, name, code.name).inc()
            if method in TRANSFERS:
                self._metrics.transfer_seconds.labels(name).observe(time.monotonic() - started)


async def _counted(messages: AsyncIterable[Any], counter: Any) -> AsyncIterator[Any]:
    async for message in messages:
        yield _counting(message, counter)


def _counting(message: Any, counter: Any) -> Any:
    if message.WhichOneof("payload") == "chunk":
        counter.inc(len(message.chunk.data))
    return message
