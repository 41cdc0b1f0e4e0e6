"""FedmekiClient: the Python SDK over JobService (submit, follow, cancel jobs; download their models)."""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from fedmeki_core import convert
from fedmeki_core.backoff import Backoff
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError, UnavailableError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.kits import Kit, load_kit
from fedmeki_core.privacy.he import CkksContext, load_public_context
from fedmeki_core.privacy.he.model import rebuild_model
from fedmeki_core.privacy.he.policy import uses_ckks
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from fedmeki_core.records import CheckpointInfo, JobEvent, JobState, JobStatus
from fedmeki_core.rpc_errors import error_from_rpc, retry_later
from fedmeki_core.transfer import ResumableDownload
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, iter_file_chunks

logger = logging.getLogger(__name__)

T = TypeVar("T")
DownloadProgress = Callable[[int, int], None]  # (bytes so far, total bytes)
_DOWNLOAD_ATTEMPTS = 5


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 pings on a connection: one after `seconds` without traffic; no answer within `timeout_seconds` and
    the connection is declared dead, its calls fail with UNAVAILABLE and the channel reconnects. This is what
    notices a network that stops forwarding without closing anything (a NAT or firewall dropping state)."""

    seconds: float
    timeout_seconds: float

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.keepalive_time_ms", int(self.seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),  # between long polls too
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging while nothing gets through
            ("grpc.http2.ping_timeout_ms", int(self.timeout_seconds * 1000)),
        ]


def channel_options(
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, keepalive: Keepalive | None = None
) -> list[tuple[str, int]]:
    limit = chunk_bytes + (1 << 20)
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    return options + (keepalive.options() if keepalive else [])


def open_channel(
    address: str, kit: Kit | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES, keepalive: Keepalive | None = None
) -> grpc.Channel:
    """A channel to the coordinator: mTLS as the kit's site (verifying the coordinator against the kit's CA),
    or plaintext without a kit; with `keepalive`, dead connections are detected (see Keepalive)."""
    options = channel_options(chunk_bytes, keepalive)
    if kit is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=kit.ca_pem, private_key=kit.key_pem, certificate_chain=kit.cert_pem
    )
    return grpc.secure_channel(address, credentials, options=options)


class FedmekiClient:
    """A connection to a coordinator's JobService. Errors arrive as FedmekiError subclasses.

    With `kit` (a researcher's or admin's startup kit, or its folder) it speaks mTLS as that person.
    """

    def __init__(
        self,
        address: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        kit: Kit | Path | None = None,
        busy_retry_seconds: float = 60.0,
    ) -> None:
        self.address = address
        self._busy_retry_seconds = busy_retry_seconds
        self._chunk_bytes = chunk_bytes
        self._channel = open_channel(address, load_kit(kit) if isinstance(kit, Path) else kit, chunk_bytes)
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FedmekiClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def submit_job(
        self, spec: JobSpec, weights: Path | None = None, ckks_public_context: Path | None = None
    ) -> JobStatus:
        """Submit a job with its initial weights: a safetensors file, or built from the spec when None.

        A job with `privacy.secure_aggregation: ckks` goes with the federation's public context (public.ckks);
        the spec's `ckks_context_sha256` is filled in from it (or must match it).
        """
        spec, context = _with_ckks_context(spec, ckks_public_context)
        with _initial_weights(spec, weights) as path:
            size, digest = path.stat().st_size, sha256_file(path)

            def messages() -> Iterator[jobs_pb2.SubmitJobRequest]:
                yield jobs_pb2.SubmitJobRequest(
                    header=jobs_pb2.SubmitJobHeader(
                        spec=convert.job_spec_to_proto(spec),
                        weights_size=size,
                        weights_sha256=digest,
                        ckks_public_context=context,
                    )
                )
                for chunk in iter_file_chunks(path, 0, self._chunk_bytes):
                    yield convert.chunk_message(jobs_pb2.SubmitJobRequest, chunk)

            return convert.job_from_proto(self._call(lambda: self._stub.SubmitJob(messages())))

    def get_job(self, job_id: str) -> JobStatus:
        return convert.job_from_proto(self._call(lambda: self._stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id))))

    def list_jobs(self, states: Iterable[JobState] = (), page_size: int = 0) -> list[JobStatus]:
        """Every job in these states (all when none), oldest first, fetched page by page (`page_size` 0: the
        coordinator's default)."""
        wanted = [convert.job_state_to_proto(s) for s in states]
        jobs: list[JobStatus] = []
        token = ""
        while True:
            request = jobs_pb2.ListJobsRequest(states=wanted, page_size=page_size, page_token=token)
            page = self._call(partial(self._stub.ListJobs, request))
            jobs.extend(convert.job_from_proto(j) for j in page.jobs)
            token = page.next_page_token
            if not token:
                return jobs

    def cancel_job(self, job_id: str, reason: str = "") -> JobStatus:
        request = jobs_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return convert.job_from_proto(self._call(lambda: self._stub.CancelJob(request)))

    def watch_job(self, job_id: str) -> Iterator[JobEvent]:
        """A snapshot of the job, then its events as they happen, until it ends. A stream refused for the
        coordinator being at capacity is asked again, as `_call` does."""
        stream = self._call(lambda: _started(self._stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id))))
        try:
            for message in stream:
                yield convert.event_from_proto(message)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def download_checkpoint(
        self, job_id: str, output: Path, round_number: int = -1, progress: DownloadProgress | None = None
    ) -> CheckpointInfo:
        """Download a checkpoint (the latest when `round_number` is -1) to `output`, resuming after drops."""
        output.with_name(output.name + ".part").unlink(missing_ok=True)  # a fresh download, never another file's
        download = ResumableDownload(output)
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            request = jobs_pb2.DownloadCheckpointRequest(
                job_id=job_id, round=download.info.round if download.info else round_number, offset=download.offset
            )
            try:
                download.consume(self._with_progress(self._stub.DownloadCheckpoint(request), download, progress))
                break
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                if not isinstance(error, UnavailableError) or attempt == _DOWNLOAD_ATTEMPTS:
                    raise error from None
                logger.warning("download interrupted (%s); resuming at byte %d", error.message, download.offset)
        return download.finish()

    def download_decrypted(self, job_id: str, secret: CkksContext, output: Path, round_number: int = -1) -> int:
        """A CKKS job's plaintext model after `round_number` (-1: the latest), rebuilt here with the secret key from
        checkpoint 0 and the encrypted aggregates; returns the round."""
        job = self.get_job(job_id)
        if not uses_ckks(job.spec):
            raise InvalidInputError(f"job {job_id} does not use CKKS secure aggregation: download its checkpoint")
        last = job.current_round if round_number < 0 else round_number
        with tempfile.TemporaryDirectory(prefix="fedmeki-ckks-") as tmp:
            files = [Path(tmp) / f"round-{number:05d}" for number in range(last + 1)]
            for number, path in enumerate(files):
                self.download_checkpoint(job_id, path, number)
            rebuild_model(secret, files[0], files[1:], output, job.spec.privacy.ckks_max_norm)
        return last

    @staticmethod
    def _with_progress(
        messages: Iterable[common_pb2.CheckpointChunk], download: ResumableDownload, progress: DownloadProgress | None
    ) -> Iterator[common_pb2.CheckpointChunk]:
        for message in messages:
            yield message
            if progress is not None and download.info is not None and message.WhichOneof("payload") == "chunk":
                progress(message.chunk.offset + len(message.chunk.data), download.info.size_bytes)

    def _call(self, call: Callable[[], T]) -> T:
        """Make the call; one the coordinator refused only for being at capacity (it did nothing) is made again
        after a backoff with jitter, for at most `busy_retry_seconds`."""
        backoff = Backoff(initial=0.5, maximum=10.0)
        give_up = time.monotonic() + self._busy_retry_seconds
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                delay = backoff.next_delay()
                if not retry_later(exc) or time.monotonic() + delay > give_up:
                    raise error_from_rpc(exc) from None
                logger.warning("the coordinator is busy (%s); retrying in %.1fs", exc.details(), delay)
            time.sleep(delay)


def _started(stream: Iterator[T]) -> Iterator[T]:
    """The stream with its first message already received (so that a refusal raises here), then the rest."""
    first = next(stream, None)
    return iter(()) if first is None else itertools.chain((first,), stream)


def _with_ckks_context(spec: JobSpec, public_context: Path | None) -> tuple[JobSpec, bytes]:
    if not uses_ckks(spec):
        if public_context is not None:
            raise InvalidJobSpecError(
                "privacy.secure_aggregation", "must be ckks or cyclic for a job sent with a CKKS context"
            )
        return spec, b""
    if public_context is None:
        raise InvalidJobSpecError(
            "privacy.secure_aggregation",
            f"{spec.privacy.secure_aggregation} needs the federation's public context (--ckks-public-context)",
        )
    try:
        data = public_context.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read the CKKS public context {public_context}: {exc}") from None
    fingerprint = load_public_context(data).fingerprint
    if spec.privacy.ckks_context_sha256 not in ("", fingerprint):
        raise InvalidJobSpecError(
            "privacy.ckks_context_sha256", f"does not match {public_context} (fingerprint {fingerprint})"
        )
    privacy = spec.privacy.model_copy(update={"ckks_context_sha256": fingerprint})
    return spec.model_copy(update={"privacy": privacy}), data


@contextmanager
def _initial_weights(spec: JobSpec, weights: Path | None) -> Iterator[Path]:
    if weights is not None:
        yield weights
        return
    from safetensors.torch import save_file

    from fedmeki_core.models.build import build_job_model, initial_tensors

    model = build_job_model(spec)
    with tempfile.TemporaryDirectory(prefix="fedmeki-weights-") as tmp:
        path = Path(tmp) / "initial.safetensors"
        save_file(initial_tensors(spec, model), str(path))
        yield path
