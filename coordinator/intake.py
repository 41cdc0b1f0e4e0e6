"""Intake: receiving an admitted update's bytes (coordinator/admission.py admits it), and recording a verified
update, ring hop or evaluation report."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy.orm import Session

from coordinator import cyclic, evaluations, injections
from coordinator.admission import Admission, UploadHeader
from coordinator.artifacts import Artifacts, Spool
from coordinator.credentials import SiloIdentity
from coordinator.effects import fire
from coordinator.modes import Modes
from coordinator.offload import Offload, upload_batch_bytes
from coordinator.publisher import Publisher
from coordinator.receiving import Receiver
from coordinator.round_table import Event
from coordinator.rounds import central_dp, round_for_silo, server_half, silo_round, takes_report
from coordinator.secure_aggregation import ciphertext_header_check
from coordinator.store.database import Database
from coordinator.store.group_commit import GroupCommit
from coordinator.store.models import Base, Update
from fedmeki_core.errors import (
    AlreadyExistsError,
    ConflictError,
    StalledError,
    TruncatedUpdateError,
    UnavailableError,
)
from fedmeki_core.faults import crash_point
from fedmeki_core.privacy.he import verify_ciphertext_file
from fedmeki_core.records import (
    RelayAction,
    RoundKind,
    UpdateAccepted,
    UpdateReceipt,
    UploadProgress,
)

logger = logging.getLogger(__name__)


class Chunk(Protocol):
    offset: int
    data: bytes


class Intake:
    def __init__(
        self,
        database: Database,
        artifacts: Artifacts,
        modes: Modes,
        publisher: Publisher,
        offload: Offload,
        lock: threading.RLock,
        wake: threading.Event,
        clock: Callable[[], datetime],
        max_header_bytes: int,
    ) -> None:
        self._db = database
        self._artifacts = artifacts
        self._modes = modes
        self._publisher = publisher
        self._offload = offload
        self._lock = lock
        self._wake = wake
        self._now = clock
        self._max_header_bytes = max_header_bytes
        self._uploading: set[tuple[str, int, str]] = set()  # (job, round, silo) of uploads in progress
        self._uploading_lock = threading.Lock()
        # Updates and evaluation reports of many silos, checked and committed together under the scheduler's lock.
        self._writes = GroupCommit(database, lock)

    async def record(
        self, admission: Admission, chunks: AsyncIterable[Chunk], witness: Sequence[Base] = ()
    ) -> UpdateReceipt:
        """Receive an admitted update's bytes into a spool, verify them, and record the update, with the rows in
        `witness` (the call's audit row) in the same transaction. The chunks come on the event loop; they are
        validated and spooled on the blocking pool, a batch at a time while the next batch arrives
        (`Offload.consume`).

        A stream cut off (stalled, its connection dead, cancelled, or ended short) keeps what came, for it to
        resume."""
        opened: list[_Reception] = []  # `_open` puts its reception here even when this call is cancelled meanwhile
        try:
            await self._offload.run(self._open, admission, witness, opened)
            reception = opened[0]
            header = admission.header
            batch = upload_batch_bytes(header.total_size - header.offset)
            await self._offload.consume(chunks, reception.feed, _chunk_size, batch)
            receipt = await self._offload.run(reception.finish)
        except asyncio.CancelledError:  # the silo went away or its connection died: as a stream cut off
            if opened:
                await self._offload.run(opened[0].close, cut_off=True)
            raise
        except BaseException as exc:
            if opened:
                await self._offload.run(opened[0].close, cut_off=isinstance(exc, _CUT_OFF))
            raise
        await self._offload.run(reception.close, cut_off=False)
        return receipt

    def _open(self, admission: Admission, witness: Sequence[Base], opened: list[_Reception]) -> None:
        silo, header, ckks = admission.silo, admission.header, admission.ckks
        key = (header.job_id, header.round, silo.id)
        with self._uploading_lock:
            if key in self._uploading:
                raise ConflictError(f"an upload from silo {silo.name!r} for this round is already in progress")
            self._uploading.add(key)
        try:
            spool = (
                self._artifacts.resume(header.job_id, header.round, silo.id, header.sha256, header.offset)
                if header.offset
                else self._artifacts.spool(header.job_id, header.total_size)
            )
        except BaseException:
            self.release(key)
            raise

        def progress(received: int, total: int) -> None:
            self._publisher.upload_progress(header.job_id, UploadProgress(silo.name, header.round, received, total))

        try:
            receiver = Receiver(
                spool,
                admission.layout if ckks is None else None,  # ciphertexts: U8 blobs, checked by header and parse
                header.total_size,
                header.sha256,
                self._max_header_bytes,
                progress,
                header_check=None if ckks is None else ciphertext_header_check(admission.manifest, ckks),
                limits=admission.limits,
            )
        except BaseException:
            self._artifacts.discard(spool)
            self.release(key)
            raise
        # Handed over by `opened`, not returned: a call cancelled while this ran still closes it (and frees the key).
        opened.append(_Reception(self, self._artifacts, admission, spool, receiver, witness))

    def release(self, key: tuple[str, int, str]) -> None:
        with self._uploading_lock:
            self._uploading.discard(key)

    def accept_update(self, admission: Admission, spool: Spool, witness: Sequence[Base] = ()) -> UpdateReceipt:
        """Record a verified, spooled delta, with the rows in `witness`, in one transaction, and fold it into the
        round's running sum; returns its receipt (a hop of a cyclic round: `_accept_hop`).

        The same update accepted meanwhile (a concurrent retry got there first) is the same receipt, and this
        spool is not recorded: each (job, round, silo) counts once."""
        silo, header, spec = admission.silo, admission.header, admission.spec
        if header.relay_hop:
            self._accept_hop(admission, spool, witness)
            return UpdateReceipt(spool.size, spool.sha256)
        job_id, round_number = header.job_id, header.round
        path = self._artifacts.update_path(job_id, round_number, silo.id)
        # The slow part of making it durable (fsync, rename, the directory's fsync), outside the lock: no other
        # update of this silo for this round is being received (`_uploading`), and admission found none accepted,
        # so nothing recorded is at `path`. A crash before the row leaves a file no row names, which the silo's
        # retry overwrites and the round's commit removes.
        spool.commit(path)
        receipt = UpdateReceipt(spool.size, spool.sha256)

        def prepare(session: Session) -> tuple[list[Base], tuple[list[str], float] | None]:
            found = silo_round(session, silo, job_id, round_number)  # the round and the silo's report, in one read
            if found is not None and found.is_report(spool.size, spool.sha256, header.num_samples):
                return [*witness], None  # the same update, recorded meanwhile: the file written is the same bytes
            selected = takes_report(found, silo, job_id, round_number, RoundKind.TRAIN)  # another: AlreadyExists
            # Central DP averages uniformly: a sample-weighted mean would let a large silo exceed the clip.
            weight = 1.0 if central_dp(spec) else server_half(spec).update_weight(header.num_samples)
            return [*witness, self._update_row(silo, header, weight, spool, path)], (selected, weight)

        try:
            recorded = self._writes.write(prepare)
        except AlreadyExistsError:
            raise  # a row names the path
        except BaseException:
            path.unlink(missing_ok=True)  # the round closed under it, or the database failed: no row names it
            raise
        if recorded is None:
            return receipt
        selected, weight = recorded
        crash_point("coordinator.update_durable")
        self._modes.of(job_id, spec).recorded(round_number, admission.job_manifest, selected, silo, path, weight)
        self._publisher.update_accepted(
            job_id, UpdateAccepted(silo.name, round_number, header.num_samples, header.metrics)
        )
        self._wake.set()
        return receipt

    def _accept_hop(self, admission: Admission, spool: Spool, witness: Sequence[Base]) -> None:
        """Record a hop of a cyclic round: a silo's running sum (its update row), or the initiator's unmasked sum,
        which closes the ring and moves the round to aggregating in the same transaction."""
        silo, header = admission.silo, admission.header
        job_id, round_number, hop = header.job_id, header.round, header.relay_hop
        spool.sync()
        with self._lock, self._db.transaction() as session:
            session.add_all(witness)
            _, ring_round = self._modes.relay_round(session, silo, job_id, round_number, hop)
            assert ring_round is not None
            turn = cyclic.require_upload_turn(session, ring_round, silo.id, silo.name, hop)
            if turn.action == RelayAction.UNMASK:
                spool.commit(self._artifacts.cycle_final_path(job_id, round_number))
                fire(ring_round, Event.RING_CLOSED, self._now())
                logger.info("job %s: round %d's ring closed (hop %d)", job_id, round_number, hop)
            else:
                path = self._artifacts.update_path(job_id, round_number, silo.id)
                weight = server_half(admission.spec).update_weight(header.num_samples)
                spool.commit(path)
                session.add(self._update_row(silo, header, weight, spool, path))
        if turn.action != RelayAction.UNMASK:
            self._publisher.update_accepted(
                job_id, UpdateAccepted(silo.name, round_number, header.num_samples, header.metrics)
            )
        self._publisher.work_changed()  # the next silo's turn has come: wake its long poll
        self._wake.set()

    def _update_row(self, silo: SiloIdentity, header: UploadHeader, weight: float, spool: Spool, path: Path) -> Update:
        return Update(
            job_id=header.job_id,
            round_number=header.round,
            silo_id=silo.id,
            num_samples=header.num_samples,
            weight=weight,
            metrics=header.metrics,
            size_bytes=spool.size,
            sha256=spool.sha256,
            path=self._artifacts.relative(path),
            received_at=self._now(),
        )

    def accept_evaluation(
        self, silo: SiloIdentity, job_id: str, round_number: int, num_samples: int, metrics: dict[str, float]
    ) -> None:
        if silo.role == "injector":
            with self._lock, self._db.transaction() as session:
                injections.record_injection(session, silo, job_id, round_number, metrics, self._now())
            logger.info("job %s: injection of checkpoint %d reported by %s", job_id, round_number, silo.name)
            self._publisher.update_accepted(job_id, UpdateAccepted(silo.name, round_number, num_samples, metrics))
            self._wake.set()
            self._publisher.job_changed(job_id)
            return
        if silo.role == evaluations.ROLE:  # a score of a committed checkpoint: the rounds never wait for it
            with self._lock, self._db.transaction() as session:
                evaluations.record_evaluation(session, silo, job_id, round_number, num_samples, metrics, self._now())
            logger.info("job %s: checkpoint %d scored by the evaluator %s", job_id, round_number, silo.name)
            self._publisher.job_changed(job_id)
            return

        def prepare(session: Session) -> tuple[list[Base], None]:
            round_for_silo(session, silo, job_id, round_number, RoundKind.EVALUATE)
            row = Update(
                job_id=job_id,
                round_number=round_number,
                silo_id=silo.id,
                num_samples=num_samples,
                weight=float(num_samples),
                metrics=metrics,
                received_at=self._now(),
            )
            return [row], None

        self._writes.write(prepare)
        self._publisher.update_accepted(job_id, UpdateAccepted(silo.name, round_number, num_samples, metrics))
        self._wake.set()


def _chunk_size(chunk: Chunk) -> int:
    return len(chunk.data)


_CUT_OFF = (StalledError, TruncatedUpdateError, UnavailableError)  # a stream that may resume where it stopped


class _Reception:
    """One admitted upload being received: `feed` its chunks, `finish`, and `close` in every case (blocking calls)."""

    def __init__(
        self,
        intake: Intake,
        artifacts: Artifacts,
        admission: Admission,
        spool: Spool,
        receiver: Receiver,
        witness: Sequence[Base],
    ) -> None:
        self._intake = intake
        self._artifacts = artifacts
        self._admission = admission
        self._spool = spool
        self._receiver = receiver
        self._witness = witness

    def feed(self, chunks: list[Chunk]) -> None:
        for chunk in chunks:
            self._receiver.feed(chunk)

    def finish(self) -> UpdateReceipt:
        ckks = self._admission.ckks
        self._receiver.finish()
        if ckks is not None:
            self._spool.sync()
            verify_ciphertext_file(ckks, self._spool.path, self._admission.manifest)
        return self._intake.accept_update(self._admission, self._spool, self._witness)

    def close(self, cut_off: bool) -> None:
        """Keep what a stream cut off brought, for it to resume; discard anything else not recorded."""
        silo, header = self._admission.silo, self._admission.header
        try:
            kept = cut_off and self._artifacts.keep_partial(
                self._spool, header.job_id, header.round, silo.id, header.sha256
            )
            if not kept:
                self._artifacts.discard(self._spool)
        finally:
            self._intake.release((header.job_id, header.round, silo.id))
