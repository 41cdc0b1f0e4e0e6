"""The silo agent's strategy per task (silo_agent/modes.py): chosen once from the job's spec, and the only place in
the agent and the coordinator's mode modules that branches on the secure-aggregation setting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedmeki_core.jobspec import parse_job_spec
from silo_agent.cyclic import CyclicSilo
from silo_agent.modes import CkksMode, CyclicMode, SiloMode, task_mode
from silo_agent.secure_aggregation import CkksSilo
from silo_agent.transport import GrpcTransport

ROOT = Path(__file__).resolve().parent.parent
# The strategy modules (the agent's, the coordinator's) and the submission-time check of a CKKS job's settings.
STRATEGIES = {"silo_agent/modes.py", "coordinator/modes.py", "coordinator/secure_aggregation.py"}


@pytest.mark.parametrize(
    ("secure_aggregation", "expected"), [("none", SiloMode), ("ckks", CkksMode), ("cyclic", CyclicMode)]
)
def test_the_mode_follows_the_jobs_secure_aggregation(
    secure_aggregation: str, expected: type[SiloMode], tmp_path: Path
) -> None:
    spec = parse_job_spec(
        {
            "name": "j",
            "task": "synthetic-vitals",
            "rounds": 1,
            "min_silos": 3,
            "privacy": {"secure_aggregation": secure_aggregation},
        }
    )
    transport = GrpcTransport("127.0.0.1:1")  # never called: choosing a mode does no I/O
    ckks = CkksSilo(None, tmp_path, transport)
    mode = task_mode(spec, transport, ckks, CyclicSilo(ckks, tmp_path, transport))
    assert type(mode) is expected
    assert mode.aborts_on_bad_aggregate == (secure_aggregation != "none")


def test_no_module_outside_the_strategies_branches_on_the_privacy_mode() -> None:
    branching = [
        str(path.relative_to(ROOT))
        for package in ("silo_agent", "coordinator")
        for path in (ROOT / package).rglob("*.py")
        if re.search(r"\buses_(ckks|cyclic)\b", path.read_text())
    ]
    assert sorted(set(branching) - STRATEGIES) == []
