"""The strategies per job and per task: the agent's mode (silo_agent/modes.py) and the coordinator's
(coordinator/modes.py), each chosen once from the job's spec, and with the agent's workloads (silo_agent/workloads.py)
the only modules of the agent and the coordinator that branch on the secure-aggregation setting, on a statistics job
or on an injection task."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from coordinator import modes as coordinator_modes
from coordinator.artifacts import Artifacts
from coordinator.running_sums import RunningSums
from coordinator.secure_aggregation import CkksContexts
from coordinator.store.database import Database
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.wire import TensorSpec
from silo_agent.cyclic import CyclicSilo
from silo_agent.modes import CkksMode, CyclicMode, SiloMode, task_mode
from silo_agent.secure_aggregation import CkksSilo
from silo_agent.transport import GrpcTransport

ROOT = Path(__file__).resolve().parent.parent
# The strategy modules: the agent's (how models travel, what a task does with them) and the coordinator's.
STRATEGIES = {"silo_agent/modes.py", "silo_agent/workloads.py", "coordinator/modes.py"}
# A choice of behaviour per job or per task: its privacy mode, a statistics job, an injection task.
MODE_BRANCH = re.compile(
    r"\buses_(ckks|cyclic)\b"
    r"|\.statistics is (not )?None"
    r"|(==|!=|\bis|\bin)\s*\(?RoundKind\.INJECT|RoundKind\.INJECT\s*(==|!=)"
)


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


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ({"privacy": {"secure_aggregation": "none"}}, coordinator_modes.AggregationMode),
        ({"algorithm": {"options": {"robust": {"method": "median"}}}}, coordinator_modes.RobustMode),
        ({"privacy": {"secure_aggregation": "ckks"}}, coordinator_modes.CkksMode),
        ({"privacy": {"secure_aggregation": "cyclic"}}, coordinator_modes.CyclicMode),
        ({"task": "tabular", "statistics": {"features": ["age"]}}, coordinator_modes.StatisticsMode),
    ],
)
def test_the_coordinators_mode_is_chosen_once_for_submission_and_rounds(
    job: dict[str, Any], expected: type[coordinator_modes.AggregationMode], tmp_path: Path
) -> None:
    spec = parse_job_spec({"name": "j", "task": "synthetic-vitals", "rounds": 2, "min_silos": 3, **job})
    assert coordinator_modes.mode_class(spec) is expected
    artifacts = Artifacts(tmp_path)
    modes = coordinator_modes.Modes(artifacts, RunningSums(), CkksContexts(artifacts), Database("sqlite://"))
    assert type(modes.of("job-1", spec)) is expected


def test_a_public_context_is_refused_for_a_plaintext_job() -> None:
    spec = parse_job_spec({"name": "j", "task": "synthetic-vitals", "rounds": 2})
    with pytest.raises(InvalidInputError, match="not ckks or cyclic"):
        coordinator_modes.mode_class(spec).check_submission(spec, [], b"a context")


def test_a_statistics_job_starts_from_its_zeros() -> None:
    spec = parse_job_spec({"name": "s", "task": "tabular", "statistics": {"features": ["age"]}})
    with pytest.raises(InvalidInputError, match="submit it without a weights file"):
        coordinator_modes.mode_class(spec).check_submission(spec, [TensorSpec("w", "F32", (4,))], b"")


def test_no_module_outside_the_strategies_branches_on_the_mode_or_the_workload() -> None:
    branching = [
        str(path.relative_to(ROOT))
        for package in ("silo_agent", "coordinator")
        for path in (ROOT / package).rglob("*.py")
        if MODE_BRANCH.search(path.read_text())
    ]
    assert sorted(set(branching) - STRATEGIES) == []


@pytest.mark.parametrize(
    "branch",
    [
        "if uses_ckks(spec):",
        "elif task.spec.statistics is not None:",
        "if spec.statistics is None:",
        "if task.kind == RoundKind.INJECT:",
        "if RoundKind.INJECT != kind:",
        "if task.kind in (RoundKind.INJECT,):",
    ],
)
def test_the_check_sees_each_kind_of_branch(branch: str) -> None:
    assert MODE_BRANCH.search(branch)
