"""Jobs share a silo fairly: NextTask hands a silo work round robin between the running jobs that selected it,
so one job whose round stays open (a silo that keeps failing it) never holds the silo from the others."""

from __future__ import annotations

from safetensors.numpy import save

from coordinator.server import Coordinator
from fedmeki_core.records import JobState, RoundState
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes
from tests.test_scheduler import wait_for_state


def _training(coordinator: Coordinator, *names: str) -> list[str]:
    target = address(coordinator)
    ids = [submit_raw(target, job_spec(name=name, min_silos=2), weights_bytes(i)).id for i, name in enumerate(names)]
    for job_id in ids:
        wait_for_state(coordinator, job_id, lambda s: s.rounds and s.rounds[0].state == RoundState.TRAINING)
    return ids


def test_a_silo_with_work_in_two_jobs_gets_both_alternating(coordinator: Coordinator) -> None:
    target = address(coordinator)
    silos = [RawSilo(target, enroll(coordinator, name)) for name in ("north", "south")]
    for silo in silos:
        silo.poll()
    older, younger = _training(coordinator, "older", "younger")
    north, south = silos
    handed = []
    for _ in range(4):  # north never uploads: the older job's round stays open for it
        task = north.poll()
        assert task is not None
        handed.append(task.job_id)
    assert handed == [older, younger, older, younger]
    # Fair to a silo that does finish its rounds too: the younger job is not kept waiting behind the older one.
    assert south.poll().job_id == older  # type: ignore[union-attr]
    south.upload(older, 1, save(tensors(0.1)))
    assert south.poll().job_id == younger  # type: ignore[union-attr]


def test_a_silo_is_not_handed_a_job_it_has_finished_while_another_waits(coordinator: Coordinator) -> None:
    target = address(coordinator)
    north, south = (RawSilo(target, enroll(coordinator, name)) for name in ("north", "south"))
    for silo in (north, south):
        silo.poll()
    first, second, third = _training(coordinator, "first", "second", "third")
    assert [north.poll().job_id for _ in range(3)] == [first, second, third]  # type: ignore[union-attr]
    north.upload(second, 1, save(tensors(0.2)))
    assert [north.poll().job_id for _ in range(4)] == [first, third, first, third]  # type: ignore[union-attr]
    assert coordinator.scheduler.status(second).state == JobState.RUNNING
