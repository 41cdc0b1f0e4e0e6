"""A network partition mid-upload: a TCP proxy between a silo and the coordinator stops forwarding without
closing anything. Keepalive pings go unanswered on both sides: the coordinator closes the dead connection and
frees the upload's slot, the silo's call fails with UNAVAILABLE and its transport retries; once the proxy
forwards again the silo reconnects through it and the update arrives, once.

The coordinator's idle-upload cut (upload_idle_seconds) is set far beyond the test, so only keepalive can
notice the partition.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save
from sqlalchemy import select

from coordinator.server import Coordinator
from coordinator.store.models import AuditEvent, Update
from fedmeki_core.channels import Keepalive
from silo_agent.transport import GrpcTransport
from tests.conftest import address, coordinator_settings, enroll, serving, wait_until
from tests.silo_wire import TASK, job_spec, submit_raw

KEEPALIVE = Keepalive(seconds=0.5, timeout_seconds=1.0)


class BlackHoleProxy:
    """A TCP proxy on 127.0.0.1 to `target_port`. After `partition_after(n)` it forwards n more bytes from the
    clients, then drops every byte in both directions, on every connection, old or new, without closing one:
    what a network that silently stops forwarding looks like to both ends (the bytes are taken and vanish, as
    packets do, so senders are not held back by full buffers). `heal()` ends it: connections that lived through
    the partition are closed (their state is gone, as a NAT's would be) and new ones are forwarded again."""

    def __init__(self, target_port: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._budget: int | None = None  # bytes from clients still forwarded before the partition
        self._partitioned = False
        self._severed: list[socket.socket] = []  # sockets of connections the partition cut
        self._open: list[list[socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def partitioned(self) -> bool:
        return self._partitioned

    def partition_after(self, n: int) -> None:
        with self._lock:
            self._budget = n

    def heal(self) -> None:
        with self._lock:
            self._budget, self._partitioned = None, False
            severed, self._severed = self._severed, []
        for sock in severed:
            sock.close()

    def close(self) -> None:
        self._listener.close()
        self.heal()
        with self._lock:
            for connection in self._open:
                for sock in connection:
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._partitioned:  # nothing gets through: the handshake's bytes vanish too
                    self._severed.append(client)
                    upstream = None
                else:
                    upstream = socket.create_connection(self._target)
                    self._open.append([client, upstream])
            if upstream is None:
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
            else:
                threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _swallow(self, sock: socket.socket) -> None:
        try:
            while sock.recv(1 << 16):
                pass
        except OSError:
            pass

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                with self._lock:
                    if source in self._severed:
                        continue  # taken and dropped
                    if from_client and self._budget is not None:
                        data, self._budget = data[: self._budget], max(0, self._budget - len(data))
                        if self._budget == 0:  # the partition starts: every connection is cut
                            self._partitioned = True
                            self._severed += [sock for connection in self._open for sock in connection]
                            self._open = []
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()


@pytest.fixture
def partitioned_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    settings = coordinator_settings(
        tmp_path / "coordinator",
        keepalive_seconds=KEEPALIVE.seconds,
        keepalive_timeout_seconds=KEEPALIVE.timeout_seconds,
        keepalive_min_client_seconds=0.1,
        upload_idle_seconds=3600,
    )
    instance = Coordinator(settings)
    yield from serving(instance)


def test_a_partition_mid_upload_is_detected_freed_and_survived(
    partitioned_coordinator: Coordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="silo_agent.transport")
    coordinator = partitioned_coordinator
    credential = enroll(coordinator, "behind-a-firewall")
    proxy = BlackHoleProxy(coordinator.port)
    transport = GrpcTransport(
        f"127.0.0.1:{proxy.port}", credential, chunk_bytes=1 << 16, retry_max_seconds=120, keepalive=KEEPALIVE
    )
    try:
        transport.next_task([TASK], "cpu", 0)
        weights = save({"w": np.zeros((512, 1024), np.float32)})  # 2 MiB: the partition falls mid-upload
        job = submit_raw(address(coordinator), job_spec(), weights, chunk=1 << 20)
        task = transport.next_task([TASK], "cpu", 10)
        assert task is not None and task.job_id == job.id
        delta = tmp_path / "delta.safetensors"
        delta.write_bytes(save({"w": np.full((512, 1024), 0.25, np.float32)}))
        sha256 = hashlib.sha256(delta.read_bytes()).hexdigest()

        proxy.partition_after(256 << 10)  # the header and a few chunks get through
        outcome: list[BaseException | None] = []

        def upload() -> None:
            try:
                transport.upload(task, delta, sha256, 10, {}, fresh=True)  # its first attempt asks nothing
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        uploader = threading.Thread(target=upload)
        uploader.start()
        wait_until(lambda: proxy.partitioned, timeout=30)

        def dead_stream_ended() -> bool:
            with coordinator.database.read() as session:
                return (
                    session.scalars(
                        select(AuditEvent.status).where(
                            AuditEvent.action == "UploadUpdate", AuditEvent.job_id == job.id
                        )
                    ).first()
                    is not None
                )

        wait_until(dead_stream_ended, timeout=30)  # the coordinator gave the stream up while nothing got through
        assert coordinator.slots.uploads.in_use == 0
        # What got through before the partition (the header and at most 256 KiB) is held for the upload to resume.
        held = [p for p in (coordinator.artifacts.root / "incoming").rglob("*") if p.is_file()]
        assert len(held) == 1 and 0 < held[0].stat().st_size <= 256 << 10, held
        held_bytes = held[0].stat().st_size
        # The silo's call failed too, and its transport retries.
        wait_until(lambda: any("coordinator unavailable" in r.getMessage() for r in caplog.records), timeout=30)
        assert not outcome, "the upload ended during the partition instead of retrying"

        proxy.heal()
        uploader.join(timeout=60)
        assert outcome == [None]
        resumed = [r.getMessage() for r in caplog.records if "resuming the upload at byte" in r.getMessage()]
        assert resumed == [f"job {job.id} round 1: resuming the upload at byte {held_bytes} of {delta.stat().st_size}"]
        asked = coordinator.metrics.registry.get_sample_value(
            "fedmeki_rpc_handled_total", {"service": "fedmeki.v1.SiloService", "method": "UploadOffset", "code": "OK"}
        )
        assert asked == 1  # the retry asked where to resume; the fresh first attempt did not
        assert not [p for p in (coordinator.artifacts.root / "incoming").rglob("*") if p.is_file()]
    finally:
        transport.close()
        proxy.close()

    with coordinator.database.read() as session:
        rows = session.scalars(select(Update).where(Update.job_id == job.id)).all()
        statuses = session.scalars(select(AuditEvent.status).where(AuditEvent.action == "UploadUpdate")).all()
    assert [row.sha256 for row in rows] == [sha256]
    # The dead stream, then the retry through the healed network. gRPC ends a call whose connection died either
    # with an error or as if the client had stopped sending: UNAVAILABLE, or a truncated upload.
    assert statuses[0] in ("UNAVAILABLE", "INVALID_ARGUMENT") and statuses[1:] == ["OK"], statuses
