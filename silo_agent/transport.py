"""GrpcTransport: the agent's side of SiloService. Only this module (and the converters) touch protobuf."""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc

from fedmeki_core import convert
from fedmeki_core.backoff import Backoff
from fedmeki_core.channels import Keepalive, open_channel
from fedmeki_core.errors import UnavailableError
from fedmeki_core.faults import crash_point
from fedmeki_core.files import sha256_file
from fedmeki_core.kits import Kit
from fedmeki_core.proto.v1 import common_pb2, silo_pb2, silo_pb2_grpc
from fedmeki_core.records import CheckpointInfo, RelayStep, RoundTask
from fedmeki_core.rpc_errors import error_from_rpc
from fedmeki_core.transfer import ResumableDownload
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, iter_file_chunks
from silo_agent.state import Enrollment

logger = logging.getLogger(__name__)

PLAINTEXT_ENCODING = "safetensors"  # an update's encoding in its upload header: plaintext tensors

T = TypeVar("T")


class GrpcTransport:
    """Calls the coordinator; failures arrive as FedmekiError subclasses.

    Idempotent calls (polls, downloads, and uploads, which the coordinator deduplicates) are retried on
    UnavailableError with exponential backoff and jitter, for at most `retry_max_seconds`; a busy coordinator that
    says when to come back (an upload's turn at the upload cap) is asked again then, a wait not counted in
    `retry_max_seconds`. With a startup
    `kit` the channel is mTLS and the certificate is the silo's identity; without one, `credential` is. With
    `keepalive`, a connection that stops carrying anything fails its calls with UNAVAILABLE, and they are retried
    on a new one.
    """

    def __init__(
        self,
        address: str,
        credential: str = "",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        retry_max_seconds: float = 30.0,
        kit: Kit | None = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        self._address = address
        self._metadata = [("authorization", f"Bearer {credential}")] if credential else []
        self._chunk_bytes = chunk_bytes
        self._retry_max_seconds = retry_max_seconds
        self._channel = open_channel(address, kit, chunk_bytes, keepalive)
        self._stub = silo_pb2_grpc.SiloServiceStub(self._channel)
        self._stopping = threading.Event()
        self._poll: grpc.Future | None = None
        self._poll_lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def stop(self) -> None:
        """The agent was asked to stop: a waiting long poll ends now (no task) and no retry waits out its delay; a
        transfer under way goes on. Safe from any thread."""
        self._stopping.set()
        with self._poll_lock:
            if self._poll is not None:
                self._poll.cancel()

    def enroll(self, token: str) -> Enrollment:
        response = self._once(lambda: self._stub.Enroll(silo_pb2.EnrollRequest(token=token)))
        return Enrollment(
            silo_id=response.silo_id,
            silo_name=response.silo_name,
            coordinator=self._address,
            credential=response.credential,
        )

    def next_task(self, tasks: list[str], device: str, wait_seconds: float) -> RoundTask | None:
        request = silo_pb2.NextTaskRequest(tasks=tasks, device=device, wait_seconds=wait_seconds)

        def poll() -> silo_pb2.NextTaskResponse:
            future = self._stub.NextTask.future(request, metadata=self._metadata, timeout=wait_seconds + 30)
            with self._poll_lock:
                self._poll = future
            if self._stopping.is_set():
                future.cancel()
            try:
                response: silo_pb2.NextTaskResponse = future.result()
                return response
            finally:
                with self._poll_lock:
                    self._poll = None

        try:
            response = self._retrying(poll)
        except grpc.FutureCancelledError:
            return None  # stopped while waiting
        return convert.task_from_proto(response.task) if response.HasField("task") else None

    def download(
        self, checkpoint: CheckpointInfo, destination: Path, spare: Path | None = None, relay_hop: int = 0
    ) -> None:
        """Fetch a checkpoint to `destination`, resuming a partial file (or overwriting `spare`); checks sha256.

        With `relay_hop` it fetches that hop's running sum of cyclic round `checkpoint.round` instead."""
        if destination.exists() and sha256_file(destination) == checkpoint.sha256:
            return
        download = ResumableDownload(destination, spare)

        def fetch() -> None:
            request = silo_pb2.DownloadModelRequest(
                job_id=checkpoint.job_id, round=checkpoint.round, offset=download.offset, relay_hop=relay_hop
            )
            download.consume(self._stub.DownloadModel(request, metadata=self._metadata))

        self._retrying(fetch)
        download.finish()

    def download_delta(
        self,
        checkpoint: CheckpointInfo,
        base: CheckpointInfo,
        delta: Path,
        full: Path,
        spare: Path | None = None,
        delta_spare: Path | None = None,
    ) -> bool:
        """Ask for `checkpoint` as its delta from `base` (the checkpoint this silo holds): True when the delta came,
        to `delta` (resumable, overwriting `delta_spare`; checked against its sha256); False when the coordinator
        sent the whole checkpoint instead, to `full` (overwriting `spare`; checked), as it does when it holds no
        delta from `base`."""
        partial = ResumableDownload(delta, delta_spare)
        whole: ResumableDownload | None = None

        def fetch() -> None:
            nonlocal whole
            if whole is not None:  # the coordinator chose the whole checkpoint: resume that
                request = silo_pb2.DownloadModelRequest(
                    job_id=checkpoint.job_id, round=checkpoint.round, offset=whole.offset
                )
                whole.consume(self._stub.DownloadModel(request, metadata=self._metadata))
                return
            request = silo_pb2.DownloadModelRequest(
                job_id=checkpoint.job_id,
                round=checkpoint.round,
                offset=partial.offset,
                base_round=base.round,
                base_sha256=base.sha256,
            )
            messages = self._stub.DownloadModel(request, metadata=self._metadata)
            first = next(messages, None)
            if first is not None and first.WhichOneof("payload") == "checkpoint":
                whole = ResumableDownload(full, spare)  # sent from byte 0 (a full partial is resumed by the caller)
                whole.consume(itertools.chain([first], messages))
            else:
                partial.consume(itertools.chain([] if first is None else [first], messages))

        self._retrying(fetch)
        if whole is not None:
            whole.finish()
            for suffix in (".part", ".reuse"):  # what the delta would have been written to
                delta.with_name(delta.name + suffix).unlink(missing_ok=True)
            return False
        partial.finish()
        return True

    def upload(
        self,
        task: RoundTask,
        delta: Path,
        sha256: str,
        num_samples: int,
        metrics: dict[str, float],
        relay_hop: int = 0,
        encoding: str = PLAINTEXT_ENCODING,
        fresh: bool = False,
    ) -> None:
        """Stream the delta up, in `encoding` (the task's mode says which); each attempt asks first how much of it the
        coordinator holds (an upload that broke off, in this process or before a restart) and sends only the rest.
        A `fresh` delta (trained by this process just now: nothing of it can be held there) skips the question on
        its first attempt, a round trip less per round over a WAN; a retry asks, as the first attempt may have left
        bytes behind."""
        total_size = delta.stat().st_size
        where = silo_pb2.UploadOffsetRequest(
            job_id=task.job_id, round=task.round, sha256=sha256, relay_hop=relay_hop, total_size=total_size
        )

        ask = not fresh  # a fresh delta's first attempt does not ask; every later one does

        def attempt() -> None:
            nonlocal ask
            offset = self._held_offset(where) if ask else 0
            ask = True
            if 0 < offset < total_size:
                logger.info(
                    "job %s round %d: resuming the upload at byte %d of %d", task.job_id, task.round, offset, total_size
                )
            else:
                offset = 0
            header = silo_pb2.UpdateHeader(
                job_id=task.job_id,
                round=task.round,
                num_samples=num_samples,
                metrics=common_pb2.Metrics(values=metrics),
                encoding=encoding,
                total_size=total_size,
                sha256=sha256,
                relay_hop=relay_hop,
                offset=offset,
            )

            def messages() -> Iterator[silo_pb2.UploadUpdateRequest]:
                yield silo_pb2.UploadUpdateRequest(header=header)
                for chunk in iter_file_chunks(delta, offset, self._chunk_bytes):
                    yield convert.chunk_message(silo_pb2.UploadUpdateRequest, chunk)
                    crash_point("silo.mid_upload")

            self._stub.UploadUpdate(messages(), metadata=self._metadata)

        self._retrying(attempt)

    def _held_offset(self, where: silo_pb2.UploadOffsetRequest) -> int:
        """How many bytes of the upload the coordinator holds (0 where it answers that the update was accepted
        already, or its round closed: the upload's header then gets the answer, a replay its receipt)."""
        try:
            return int(self._stub.UploadOffset(where, metadata=self._metadata).offset)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            return 0

    def abort_round(self, task: RoundTask, reason: str) -> None:
        request = silo_pb2.AbortRoundRequest(job_id=task.job_id, round=task.round, reason=reason)
        self._retrying(lambda: self._stub.AbortRound(request, metadata=self._metadata))

    def relay_step(self, task: RoundTask) -> RelayStep:
        request = silo_pb2.RelayStepRequest(job_id=task.job_id, round=task.round)
        return convert.relay_step_from_proto(
            self._retrying(lambda: self._stub.RelayStep(request, metadata=self._metadata))
        )

    def report_evaluation(self, task: RoundTask, num_samples: int, metrics: dict[str, float]) -> None:
        request = silo_pb2.ReportEvaluationRequest(
            job_id=task.job_id, round=task.round, num_samples=num_samples, metrics=common_pb2.Metrics(values=metrics)
        )
        self._retrying(lambda: self._stub.ReportEvaluation(request, metadata=self._metadata))

    def _once(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _retrying(self, call: Callable[[], T]) -> T:
        give_up = time.monotonic() + self._retry_max_seconds
        backoff = Backoff(initial=0.4, maximum=10.0)
        while True:
            try:
                return self._once(call)
            except UnavailableError as exc:
                if exc.retry_after is not None:  # a busy coordinator's turn for this call: a wait it asked for,
                    # not a failure, so it is not taken from the time allowed for failures
                    delay = exc.retry_after * random.uniform(1.0, 1.1)
                    give_up += delay
                else:
                    delay = backoff.next_delay()
                    if time.monotonic() + delay > give_up:
                        raise
                if self._stopping.is_set():
                    raise
                logger.warning("coordinator unavailable (%s); retrying in %.1fs", exc.message, delay)
                if self._stopping.wait(delay):
                    raise
