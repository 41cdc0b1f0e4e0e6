"""FedmekiClient: the Python SDK over JobService (submit, follow, cancel jobs; download their models)."""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from fedmeki_core import convert, convert_spec
from fedmeki_core.backoff import Backoff
from fedmeki_core.channels import open_channel
from fedmeki_core.errors import FedmekiError, InvalidInputError, InvalidJobSpecError, UnavailableError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.kits import Kit, load_kit
from fedmeki_core.privacy.he import CkksContext, load_public_context
from fedmeki_core.privacy.he.model import rebuild_model
from fedmeki_core.privacy.he.policy import uses_ckks
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from fedmeki_core.records import CheckpointInfo, JobEvent, JobState, JobStatus
from fedmeki_core.rpc_errors import error_from_rpc, never_connected, retry_later, with_connection_hint
from fedmeki_core.transfer import ResumableDownload
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, iter_file_chunks

logger = logging.getLogger(__name__)

T = TypeVar("T")
DownloadProgress = Callable[[int, int], None]  # (bytes so far, total bytes)
_DOWNLOAD_ATTEMPTS = 5
WATCH_RECONNECT_SECONDS = 300.0  # how long a watch keeps trying to reach a restarting coordinator
_WATCH_RETRY_SECONDS = 1.0
RESUBMIT_ATTEMPTS = 5  # a submission whose answer was lost is sent again, same request id, at most this often
# The largest model the client builds initial weights for (1 GiB of float32); a larger one comes as a weights file.
MAX_BUILT_PARAMETERS = 250_000_000


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
        self._tls = kit is not None
        self._channel = open_channel(address, load_kit(kit) if isinstance(kit, Path) else kit, chunk_bytes)
        self._stub = jobs_pb2_grpc.JobServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FedmekiClient:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def submit_job(
        self,
        spec: JobSpec,
        weights: Path | None = None,
        ckks_public_context: Path | None = None,
        base: Path | None = None,
        check_model: bool = True,
        request_id: str | None = None,
        injection_base: Path | None = None,
    ) -> JobStatus:
        """Submit a job with its initial weights: a safetensors file, or built from the spec when None.

        A weights file must hold the spec's model's tensors (names and shapes, checked on the meta device);
        `check_model=False` skips that, for benchmarks that move synthetic tensors no model has.

        A job with `privacy.secure_aggregation: ckks` goes with the federation's public context (public.ckks);
        the spec's `ckks_context_sha256` is filled in from it (or must match it). A job on a pretrained base
        (`model.pretrained`) takes the researcher's own copy of it, `base`: its fingerprint fills in (or must match)
        `model.fingerprint`, and the initial adapters and heads are built on it; without it, `weights` and a
        fingerprint given in the spec. The base itself is never sent. Likewise `injection_base`, the researcher's
        copy of the injection stage's language model (`injection.pretrained`), fills in `injection.fingerprint`.

        The submission carries `request_id` (default: a fresh random one): when its answer is lost (UNAVAILABLE, the
        connection dropped, perhaps after the coordinator recorded the job) it is sent again with the same id, after
        a backoff with jitter, up to `RESUBMIT_ATTEMPTS` times, and the coordinator answers the job the first try
        created. Reusing an id for a different job is refused (AlreadyExistsError).
        """
        request_id = request_id or uuid.uuid4().hex
        spec = parse_job_spec(spec.model_dump())  # every bound of a new job, before anything is built or sent
        spec, context = _with_ckks_context(spec, ckks_public_context)
        spec = _with_base_fingerprint(spec, base, weights)
        spec = _with_injection_fingerprint(spec, injection_base)
        with _initial_weights(spec, weights, base, check_model) as path:
            size, digest = path.stat().st_size, sha256_file(path)

            def messages() -> Iterator[jobs_pb2.SubmitJobRequest]:
                yield jobs_pb2.SubmitJobRequest(
                    header=jobs_pb2.SubmitJobHeader(
                        spec=convert_spec.job_spec_to_proto(spec),
                        weights_size=size,
                        weights_sha256=digest,
                        ckks_public_context=context,
                        request_id=request_id,
                    )
                )
                for chunk in iter_file_chunks(path, 0, self._chunk_bytes):
                    yield convert.chunk_message(jobs_pb2.SubmitJobRequest, chunk)

            answer = self._call(lambda: self._stub.SubmitJob(messages()), resends=RESUBMIT_ATTEMPTS)
            return convert.job_from_proto(answer)

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

    def watch_job(self, job_id: str, reconnect_seconds: float = WATCH_RECONNECT_SECONDS) -> Iterator[JobEvent]:
        """A snapshot of the job, then its events as they happen, until it ends.

        A stream cut before the job ends (the coordinator restarted, the network dropped) is opened again, with a
        fresh snapshot first, for up to `reconnect_seconds` without an answer; then the last error is raised.
        """
        give_up: float | None = None
        connected = False  # a first call that fails is an error at once (a wrong address, a missing kit)
        while True:
            finished = False
            try:
                for message in self._stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
                    event = convert.event_from_proto(message)
                    give_up, connected = None, True
                    if isinstance(event, JobStatus):
                        finished = event.state.finished
                    yield event
                if finished:
                    return
                error: FedmekiError = UnavailableError("the coordinator ended the stream before the job ended")
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                busy = retry_later(exc)  # refused only for the coordinator being at capacity: ask again
                if not busy and not isinstance(error, UnavailableError) and exc.code() != grpc.StatusCode.CANCELLED:
                    raise error from None
                connected = connected or busy
            give_up = give_up if give_up is not None else time.monotonic() + reconnect_seconds
            if not connected or time.monotonic() >= give_up:
                raise with_connection_hint(error, self.address, self._tls)
            logger.warning("watching job %s: %s; reconnecting", job_id, error.message)
            time.sleep(_WATCH_RETRY_SECONDS)

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
                    raise with_connection_hint(error, self.address, self._tls) from None
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

    def _call(self, call: Callable[[], T], resends: int = 0) -> T:
        """Make the call; one the coordinator refused only for being at capacity (it did nothing) is made again
        after a backoff with jitter, for at most `busy_retry_seconds`. With `resends` (only for a call the
        coordinator knows when repeated), one that failed UNAVAILABLE on a connection that was made (the answer may
        have been lost after the coordinator acted) is made again, after the same backoff, up to that many times."""
        backoff = Backoff(initial=0.5, maximum=10.0)
        give_up = time.monotonic() + self._busy_retry_seconds
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                delay = backoff.next_delay()
                error, busy = error_from_rpc(exc), retry_later(exc)
                if busy and time.monotonic() + delay <= give_up:
                    logger.warning("the coordinator is busy (%s); retrying in %.1fs", exc.details(), delay)
                elif not busy and resends > 0 and isinstance(error, UnavailableError) and not never_connected(error):
                    resends -= 1
                    logger.warning("no answer from the coordinator (%s); sending again in %.1fs", error.message, delay)
                else:
                    raise with_connection_hint(error, self.address, self._tls) from None
            time.sleep(delay)


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


def _with_base_fingerprint(spec: JobSpec, base: Path | None, weights: Path | None) -> JobSpec:
    name = spec.model.pretrained
    if name is None:
        if base is not None:
            raise InvalidJobSpecError("model.pretrained", "names no base, but a base folder was given")
        return spec
    if base is None:
        if weights is None or not spec.model.fingerprint:
            raise InvalidJobSpecError(
                "model.pretrained",
                f"{name!r} needs your copy of the base (--base FOLDER), or --weights and model.fingerprint",
            )
        return spec
    from fedmeki_core.models.base_folder import fingerprint

    own = fingerprint(base)
    if spec.model.fingerprint not in ("", own):
        raise InvalidJobSpecError("model.fingerprint", f"does not match {base} (fingerprint {own})")
    return spec.model_copy(update={"model": spec.model.model_copy(update={"fingerprint": own})})


def _with_injection_fingerprint(spec: JobSpec, base: Path | None) -> JobSpec:
    injection = spec.injection
    name = None if injection is None else injection.pretrained
    if name is None or injection is None:
        if base is not None:
            raise InvalidJobSpecError("injection.pretrained", "names no base, but a base folder was given")
        return spec
    if base is None:
        if not injection.fingerprint:
            raise InvalidJobSpecError(
                "injection.pretrained", f"{name!r} needs your copy of it (--injection-base FOLDER) or a fingerprint"
            )
        return spec
    from fedmeki_core.models.base_folder import fingerprint

    own = fingerprint(base)
    if injection.fingerprint not in ("", own):
        raise InvalidJobSpecError("injection.fingerprint", f"does not match {base} (fingerprint {own})")
    return spec.model_copy(update={"injection": injection.model_copy(update={"fingerprint": own})})


@contextmanager
def _initial_weights(spec: JobSpec, weights: Path | None, base: Path | None, check_model: bool) -> Iterator[Path]:
    from fedmeki_core.models.build import build_job_model, check_initial_weights, initial_tensors, meta_model

    if weights is not None:
        # On the meta device, nothing allocated; a pretrained base's adapters are checked by the silos that hold it.
        if check_model and spec.model.pretrained is None:
            check_initial_weights(spec, weights)
        yield weights
        return
    if spec.statistics is not None:  # no model: checkpoint 0 is the statistics' zeros
        from safetensors.numpy import save_file as save_arrays

        from fedmeki_core.statistics import initial

        with tempfile.TemporaryDirectory(prefix="fedmeki-weights-") as tmp:
            path = Path(tmp) / "initial.safetensors"
            save_arrays(initial(spec.statistics), str(path))
            yield path
        return
    from safetensors.torch import save_file

    if spec.model.pretrained is None:  # counted on the meta device before anything is allocated here
        count = sum(parameter.numel() for parameter in meta_model(spec).parameters())
        if count > MAX_BUILT_PARAMETERS:
            raise InvalidJobSpecError(
                "model",
                f"its {count:,} parameters ({count * 4 / 2**30:.1f} GiB of float32) are over the "
                f"{MAX_BUILT_PARAMETERS:,} this client builds initial weights for: build them where the memory is "
                "and give them (--weights)",
            )
    model = build_job_model(spec, base)
    with tempfile.TemporaryDirectory(prefix="fedmeki-weights-") as tmp:
        path = Path(tmp) / "initial.safetensors"
        save_file(initial_tensors(spec, model), str(path))
        yield path
