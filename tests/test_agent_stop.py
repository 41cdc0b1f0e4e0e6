"""A silo agent asked to stop (SIGTERM, Ctrl-C) stops without waiting out its long poll or its retry delays.

Both cases leave the agent a wait of minutes: the agent process must exit cleanly long before `AgentProcess.stop`
would kill it (30 s), which is what it did when the poll had to end or the retries run out first."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import address, coordinator_settings, serving, wait_until

from coordinator.server import Coordinator
from tests.agents import prepare_agent


@pytest.fixture
def patient_coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator that lets a long poll wait ten minutes."""
    yield from serving(Coordinator(coordinator_settings(tmp_path / "coordinator", max_poll_seconds=600.0)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_waiting_long_poll_ends_when_the_agent_is_stopped(
    patient_coordinator: Coordinator, tmp_path: Path, sig: int
) -> None:
    _, token = patient_coordinator.registry.add("waiting")
    agent = prepare_agent(
        address(patient_coordinator), token, tmp_path / "waiting", 0, 1, 40, extra={"poll_wait_seconds": 300}
    )
    agent.start()
    try:
        wait_until(lambda: "polling" in agent.output(), timeout=120)
        wait_until(lambda: patient_coordinator.slots.polls.in_use == 1, timeout=30)
    finally:
        agent.stop(sig)
    assert agent.process is not None
    assert agent.process.returncode == 0, agent.output()


def test_an_agent_retrying_an_unreachable_coordinator_stops_at_once(tmp_path: Path) -> None:
    gone = Coordinator(coordinator_settings(tmp_path / "coordinator"))
    gone.start()
    try:
        _, token = gone.registry.add("lost")
        agent = prepare_agent(address(gone), token, tmp_path / "lost", 0, 1, 40, extra={"retry_max_seconds": 600})
    finally:
        gone.stop(grace=0)
    agent.start()
    try:
        wait_until(lambda: "retrying in" in agent.output(), timeout=120)
    finally:
        agent.stop(signal.SIGINT)
    assert agent.process is not None
    assert agent.process.returncode == 0, agent.output()
