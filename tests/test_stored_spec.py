"""A stored job spec reads back whatever release stored it: a field or an option a later release removed is
dropped, a renamed one is renamed, a registry rule added later does not apply; a job stored so still shows and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import address
from in_process import in_process_agents

from coordinator.server import Coordinator
from coordinator.store.models import Job
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState
from fedmeki_core.stored_spec import SPEC_VERSION, VERSION_KEY, read_stored_spec, stored_spec

SPEC: dict[str, Any] = {
    "name": "stored",
    "task": "synthetic-vitals",
    "rounds": 2,
    "min_silos": 3,
    "algorithm": {"name": "fedprox", "batch_size": 16, "options": {"mu": 0.05}},
}


def _older(spec: dict[str, Any]) -> dict[str, Any]:
    """What a release before versioned specs stored, with a field and an option this release does not know."""
    old = {key: value for key, value in spec.items() if key != VERSION_KEY}
    algorithm = old["algorithm"]
    old["algorithm"] = {**algorithm, "options": {**algorithm["options"], "retired_option": 3}, "retired_field": 1}
    return {**old, "retired_setting": True}


def test_a_stored_spec_carries_its_version_and_reads_back_equal() -> None:
    spec = parse_job_spec(SPEC)
    stored = stored_spec(spec)
    assert stored[VERSION_KEY] == SPEC_VERSION
    assert read_stored_spec(stored) == spec


def test_fields_and_options_a_release_removed_are_dropped_on_read() -> None:
    spec = parse_job_spec(SPEC)
    with pytest.raises(InvalidJobSpecError):  # what submission refuses
        parse_job_spec(_older(spec.model_dump(mode="json")))
    assert read_stored_spec(_older(stored_spec(spec))) == spec


def test_an_option_renamed_after_a_spec_was_stored_is_read_under_its_new_name() -> None:
    stored = {**stored_spec(parse_job_spec(SPEC)), VERSION_KEY: 1}
    stored["algorithm"]["options"] = {"proximal_mu": 0.5}
    renamed = {2: (("algorithm.options.proximal_mu", "algorithm.options.mu"),)}
    assert read_stored_spec(stored, renamed).algorithm.options == {"mu": 0.5}
    # stored at the version that renamed it: the old name is unknown there, and dropped
    assert read_stored_spec({**stored, VERSION_KEY: 2}, renamed).algorithm.options == {}


def test_a_rule_a_later_release_added_does_not_apply_to_a_stored_spec() -> None:
    stored = stored_spec(parse_job_spec(SPEC))
    stored["algorithm"]["options"] = {"mu": -1.0}  # fedprox refuses a negative mu at submission
    stored["silos"] = ["a", "b"]  # fewer than min_silos: refused at submission
    with pytest.raises(InvalidJobSpecError):
        parse_job_spec({key: value for key, value in stored.items() if key != VERSION_KEY})
    spec = read_stored_spec(stored)
    assert (spec.algorithm.options, spec.silos) == ({"mu": -1.0}, ("a", "b"))


def test_a_job_an_older_release_stored_still_shows_and_runs_to_the_end(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    agents = in_process_agents(coordinator, tmp_path, "synthetic-vitals", 60)
    spec = parse_job_spec(SPEC)
    with FedmekiClient(address(coordinator)) as client:
        job = client.submit_job(spec)
        with coordinator.database.transaction() as session:
            row = session.get(Job, job.id)
            assert row is not None
            row.spec = _older(row.spec)
        assert client.get_job(job.id).spec == spec
        for _ in range(200):
            if (status := client.get_job(job.id)).state.finished:
                break
            for agent in agents:
                agent.run_once()
    assert status.state == JobState.COMPLETED, status.reason
    assert status.spec == spec
