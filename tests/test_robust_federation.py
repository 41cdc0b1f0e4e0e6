"""Two compromised silos of ten: plain FedAvg is visibly damaged, each robust aggregation stays near the clean run.

Ten real agents train in this process on their non-IID shares of the synthetic vitals task. Two of them are
compromised at the edge they control, their own transport: they upload their honest delta multiplied by -10
(sign-flipped and scaled), a well-formed update the coordinator cannot tell from an honest one. Six jobs of 3
rounds, about 30 s on 2 cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from in_process import in_process_agents, run_job
from safetensors import safe_open
from safetensors.numpy import save_file

from coordinator.server import Coordinator
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import RoundKind, RoundTask
from silo_agent.transport import GrpcTransport

ATTACK_SCALE = -10.0
ROBUST = [
    {"method": "clip", "clip_norm": 5.0},  # about the honest updates' L2 norm here (4 to 5.6 in round 1)
    {"method": "median"},
    {"method": "trimmed_mean", "trim_fraction": 0.2},
    {"method": "krum", "byzantine": 2},
]


class SignFlippingTransport(GrpcTransport):
    """A compromised silo's transport: while `attacking`, it uploads its delta times ATTACK_SCALE instead."""

    attacking = False

    def upload(
        self, task: RoundTask, delta: Path, sha256: str, num_samples: int, metrics: dict[str, float], **how: Any
    ) -> None:
        if self.attacking:
            with safe_open(str(delta), "numpy") as f:
                tensors = {name: f.get_tensor(name) * np.float32(ATTACK_SCALE) for name in f.keys()}  # noqa: SIM118
                metadata = f.metadata()
            delta = delta.with_name(f"flipped-{task.round:05d}.safetensors")
            save_file(tensors, str(delta), metadata=metadata)
            sha256 = sha256_file(delta)
        super().upload(task, delta, sha256, num_samples, metrics, **how)


def _job(robust: dict[str, object]) -> dict[str, object]:
    return {
        "name": f"robust-{robust.get('method', 'none')}",
        "task": "synthetic-vitals",
        "rounds": 3,
        "min_silos": 10,
        "algorithm": {"local_epochs": 1, "batch_size": 16, "learning_rate": 0.01, "options": {"robust": robust}},
    }


def test_robust_aggregation_withstands_two_compromised_silos_of_ten(
    sqlite_coordinator: Coordinator, tmp_path: Path
) -> None:
    attackers: list[SignFlippingTransport] = []

    def transport(index: int, address: str, credential: str) -> GrpcTransport:
        if index >= 2:
            return GrpcTransport(address, credential)
        attackers.append(SignFlippingTransport(address, credential))
        return attackers[-1]

    agents = in_process_agents(sqlite_coordinator, tmp_path, "synthetic-vitals", 200, silos=10, transport=transport)

    def accuracy(robust: dict[str, object], attacked: bool) -> float:
        for attacker in attackers:
            attacker.attacking = attacked
        status = run_job(sqlite_coordinator, agents, parse_job_spec(_job(robust)))
        final = next(r for r in status.rounds if r.kind == RoundKind.EVALUATE)
        print(f"{robust or 'fedavg'}{' attacked' if attacked else ''}: {final.metrics['eval_accuracy']:.3f}")
        return float(final.metrics["eval_accuracy"])

    clean = accuracy({}, attacked=False)
    assert clean > 0.85
    assert accuracy({}, attacked=True) < clean - 0.2  # plain FedAvg is visibly damaged
    for robust in ROBUST:
        assert accuracy(robust, attacked=True) > clean - 0.05, robust
