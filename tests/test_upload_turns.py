"""Uploads refused at the cap are told their turn (issue 20): the turns are spaced at the pace slots free up, in the
order of refusal; the refusal comes at the upload's first call, before its bytes; and the agent waits out its turn
without counting it against the time it allows for failures."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from safetensors.numpy import save
from sqlalchemy import func, select

from coordinator.pacing import Slots
from coordinator.server import Coordinator
from coordinator.store.models import Update
from coordinator.upload_turns import UploadTurns, upload_charge
from fedmeki_core.errors import BusyError, UnavailableError
from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc
from fedmeki_core.rpc_errors import RETRY_AFTER_MS, RETRY_LATER, error_from_rpc
from silo_agent.transport import GrpcTransport
from tests.conftest import address, coordinator_settings, enroll, serving
from tests.silo_wire import TASK, RawSilo, job_spec, submit_raw, tensors, update_messages, weights_bytes


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _refused_turn(turns: UploadTurns, silo: str, size: int = 0) -> float:
    with pytest.raises(BusyError) as caught, turns.hold(silo, size):
        pass
    assert caught.value.retry_after is not None
    return caught.value.retry_after


def test_refused_uploads_get_turns_spaced_at_the_pace_slots_free_in_the_order_refused() -> None:
    clock = _Clock()
    turns = UploadTurns(Slots(2, "uploads", "max_concurrent_uploads"), 2, clock)
    with turns.hold("a"), turns.hold("b"):
        clock.now += 3.0  # both uploads take 3 s: the mean moves from its first guess (1 s) towards 3 s
        waits = [_refused_turn(turns, silo) for silo in ("c", "d", "e")]
        assert waits == pytest.approx([0.5, 1.0, 1.5])  # the mean (1 s) over 2 slots apart, first refused first
        with pytest.raises(BusyError) as caught:
            turns.check("f")  # the upload's first call is refused the same way, with the next turn
        assert caught.value.retry_after == pytest.approx(2.0)
        clock.now += 0.5  # c's turn: it comes back and finds no slot free all the same
        assert _refused_turn(turns, "c") == pytest.approx(0.5)  # the next slot, not the back of the line
        assert _refused_turn(turns, "g") == pytest.approx(2.0)  # behind f
    assert turns.mean_seconds == pytest.approx(1.0 + 0.2 * 2.5 + 0.2 * (3.5 - 1.5))
    clock.now += 10.0  # the promised turns are past: the next starts from now
    with turns.hold("a"), turns.hold("b"):
        assert _refused_turn(turns, "h") == pytest.approx(turns.mean_seconds / 2)


def test_uploads_are_charged_their_size_up_to_what_one_may_hold_at_once() -> None:
    clock, window = _Clock(), 1 << 20  # an upload holds at most its window and two 1 MiB batches: 3 MiB
    # A size not told (0), or a hostile one (negative), is charged in full.
    assert [upload_charge(size, window) for size in (1000, 1 << 30, 0, -5)] == [1000, 3 << 20, 3 << 20, 3 << 20]
    turns = UploadTurns(Slots(100, "uploads", "max_concurrent_uploads"), 100, clock, 6 << 20, window)
    with ExitStack() as held:
        for index in range(12):  # 12 small uploads of 0.5 MiB: 6 MiB, all at once under a count cap of 100
            held.enter_context(turns.hold(f"small-{index}", 512 << 10))
        with pytest.raises(BusyError, match="upload_memory_bytes") as caught:
            turns.check("large", 1 << 30)
        assert caught.value.retry_after == pytest.approx(turns.mean_seconds / 2)  # two large uploads fit at once
        with pytest.raises(BusyError, match="upload_memory_bytes"):
            turns.check("one-more", 1)
    with turns.hold("large-1", 1 << 30), turns.hold("large-2", 1 << 30):
        assert _refused_turn(turns, "large-3", 1 << 30) > 0
    lean = UploadTurns(Slots(100, "uploads", "max_concurrent_uploads"), 100, clock, 1 << 20, window)
    with lean.hold("larger-than-the-budget", 1 << 30):  # none in progress: one is taken whatever its charge
        _refused_turn(lean, "next", 1)


@dataclass
class _Held:
    release_event: threading.Event
    call: grpc.Future

    def release(self) -> None:
        self.release_event.set()

    def receipt_size(self) -> int:
        self.release()
        return int(self.call.result(timeout=30).size_bytes)


@contextmanager
def _an_upload_held(coordinator: Coordinator, holder: RawSilo, job_id: str) -> Iterator[_Held]:
    """An upload of `holder`'s that holds its slot (its header sent, its bytes held back) until released, or the
    block ends."""
    messages = update_messages(job_id, 1, save(tensors(1.0)))
    release = threading.Event()

    def held() -> Iterator[silo_pb2.UploadUpdateRequest]:
        yield messages[0]
        release.wait()
        yield from messages[1:]

    with grpc.insecure_channel(address(coordinator)) as channel:
        holding = silo_pb2_grpc.SiloServiceStub(channel).UploadUpdate.future(held(), metadata=holder.metadata)
        try:
            while coordinator.slots.uploads.in_use < 1:
                assert not holding.done(), holding.exception()
                threading.Event().wait(0.02)
            yield _Held(release, holding)
        finally:
            release.set()


@pytest.fixture
def one_upload_at_a_time(tmp_path: Path) -> Iterator[Coordinator]:
    settings = coordinator_settings(tmp_path / "coordinator", max_concurrent_uploads=1, upload_idle_seconds=30.0)
    yield from serving(Coordinator(settings))


def test_an_upload_refused_at_the_cap_hears_its_turn_first_and_the_agent_waits_it_out(
    one_upload_at_a_time: Coordinator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    coordinator = one_upload_at_a_time
    target = address(coordinator)
    holder = RawSilo(target, enroll(coordinator, "holder"))
    waiting = RawSilo(target, enroll(coordinator, "waiting"))
    holder.poll()
    agent = GrpcTransport(target, waiting.credential, retry_max_seconds=0)  # no retry but those it is told
    agent.next_task([TASK], "cpu", 0)
    job = submit_raw(target, job_spec(min_silos=2, rounds=1), weights_bytes())
    task = agent.next_task([TASK], "cpu", 10)
    assert task is not None

    with _an_upload_held(coordinator, holder, job.id) as held:
        try:
            delta = tmp_path / "delta.safetensors"
            delta.write_bytes(save(tensors(0.5)))
            digest = hashlib.sha256(delta.read_bytes()).hexdigest()
            where = silo_pb2.UploadOffsetRequest(job_id=job.id, round=1, sha256=digest)
            with pytest.raises(grpc.RpcError) as caught:
                waiting.call("UploadOffset", where)  # refused before any byte is sent
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            metadata = dict(caught.value.trailing_metadata() or ())  # type: ignore[attr-defined]
            assert RETRY_LATER in metadata.items() and int(metadata[RETRY_AFTER_MS]) > 0
            assert error_from_rpc(caught.value).retry_after == int(metadata[RETRY_AFTER_MS]) / 1000  # type: ignore[attr-defined]

            failed: list[BaseException] = []

            def upload() -> None:
                try:
                    agent.upload(task, delta, digest, 10, {})
                except BaseException as exc:
                    failed.append(exc)

            uploading = threading.Thread(target=upload)
            with caplog.at_level(logging.WARNING, logger="silo_agent.transport"):
                uploading.start()
                while uploading.is_alive() and "max_concurrent_uploads" not in caplog.text:
                    threading.Event().wait(0.02)
                assert failed == []  # refused, and waiting for its turn, not given up
                held.release()  # the held upload ends: the next turn finds its slot free
                uploading.join(timeout=60)
            assert not uploading.is_alive() and failed == []
            assert held.receipt_size() > 0
        finally:
            agent.close()
    with coordinator.database.read() as session:
        assert session.scalar(select(func.count()).select_from(Update)) == 2


@pytest.fixture
def one_mib_of_uploads(tmp_path: Path) -> Iterator[Coordinator]:
    settings = coordinator_settings(
        tmp_path / "coordinator", max_concurrent_uploads=8, upload_memory_bytes=1 << 20, upload_idle_seconds=30.0
    )
    yield from serving(Coordinator(settings))


def test_the_first_call_is_charged_the_size_it_declares(one_mib_of_uploads: Coordinator) -> None:
    coordinator = one_mib_of_uploads
    target = address(coordinator)
    holder, small = RawSilo(target, enroll(coordinator, "holder")), RawSilo(target, enroll(coordinator, "small"))
    holder.poll()
    small.poll()
    job = submit_raw(target, job_spec(min_silos=2, rounds=1), weights_bytes())
    assert small.poll(wait=10) is not None  # the round is open
    with _an_upload_held(coordinator, holder, job.id) as held:
        digest = hashlib.sha256(b"delta").hexdigest()
        declared = silo_pb2.UploadOffsetRequest(job_id=job.id, round=1, sha256=digest, total_size=4096)
        assert small.call("UploadOffset", declared).offset == 0  # 4 KiB fits beside the held upload
        untold = silo_pb2.UploadOffsetRequest(job_id=job.id, round=1, sha256=digest)  # charged in full
        with pytest.raises(grpc.RpcError) as caught:
            small.call("UploadOffset", untold)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "upload_memory_bytes" in (caught.value.details() or "")
        assert held.receipt_size() > 0


@pytest.mark.parametrize(
    ("told", "believed"),
    [
        ("1500", 1.5),
        ("999999999999", 60.0),  # 31 years: held to the longest wait a coordinator tells
        ("9" * 5000, None),  # past `int`'s digit limit: not a wait, and no crash
        ("-5", None),
        ("", None),
    ],
)
def test_a_told_wait_is_believed_only_as_ascii_milliseconds_up_to_a_minute(told: str, believed: float | None) -> None:
    def refuse(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((RETRY_LATER, (RETRY_AFTER_MS, told)))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")

    server = grpc.server(ThreadPoolExecutor(max_workers=1))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("test.Busy", {"Call": grpc.unary_unary_rpc_method_handler(refuse)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Busy/Call")(b"", timeout=10)
    finally:
        server.stop(grace=None)
    error = error_from_rpc(caught.value)
    assert isinstance(error, UnavailableError)
    assert error.retry_after == believed
