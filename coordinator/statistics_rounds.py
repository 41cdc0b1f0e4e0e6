"""A statistics job's aggregation (modes.StatisticsMode): the silos' releases are summed (min/max taken), not averaged.

Round 1's checkpoint holds the global counts, sums, extremes and the histogram edges every silo bins on in round 2;
round 2's adds the squares and histograms. Where the job releases per-silo figures (statistics.per_silo), each
silo's round-1 figures wait in a side file the silos never download, and join its round-2 figures in the result
(`silo/<name>/<tensor>`): only the researcher who downloads the result sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from coordinator.aggregation import AggregationError
from coordinator.artifacts import Artifacts
from coordinator.store.database import Database
from coordinator.store.models import Checkpoint, Silo, Update
from fedmeki_core.files import HashingWriter, atomic_write
from fedmeki_core.jobspec_statistics import StatisticsSpec
from fedmeki_core.statistics import combine, silo_tensors
from fedmeki_core.wire import TensorSpec, iter_tensors, write_safetensors

Array = np.ndarray[Any, Any]


def read_tensors(path: Path) -> dict[str, Array]:
    """Every tensor of a safetensors file, copied (iter_tensors reuses its buffer)."""
    return {spec.name: np.array(value, dtype=np.float64) for spec, value in iter_tensors(path)}


class StatisticsRounds:
    """One statistics job's rounds: each one's releases read whole at its end (a few numbers per feature)."""

    def __init__(self, job_id: str, spec: StatisticsSpec, artifacts: Artifacts, database: Database) -> None:
        self._job_id = job_id
        self._statistics = spec
        self._artifacts = artifacts
        self._db = database

    def aggregate(self, number: int, updates: Sequence[Update], current: Checkpoint) -> tuple[Path, int, str]:
        """Write round `number`'s checkpoint from its releases and the last one; (path, size, sha256)."""
        if number == 2:
            self.require_round_1_silos({update.silo_id for update in updates})
        releases = [read_tensors(self._artifacts.absolute(update.path)) for update in updates]
        with np.errstate(over="ignore"):  # an overflow is refused below, with its reason
            result = combine(self._statistics, number, read_tensors(self._artifacts.absolute(current.path)), releases)
        overflowed = sorted(name for name, value in result.items() if not np.isfinite(value).all())
        if overflowed:  # each release is finite (checked at upload), their sum may not be
            raise AggregationError(f"the silos' releases of {overflowed[0]!r} sum to a value beyond float64")
        extra: dict[str, Array] = {}
        if self._statistics.per_silo:
            names = self._silo_names([update.silo_id for update in updates])
            for update, release in zip(updates, releases, strict=True):
                extra |= silo_tensors(names[update.silo_id], number, release)
            side = self._side_file()
            if number == 1:
                self._write(side, extra)
                extra = {}
            elif side.exists():
                extra = read_tensors(side) | extra
        path = self._artifacts.checkpoint_path(self._job_id, number)
        return (path, *self._write(path, result | extra))

    def require_round_1_silos(self, silos: set[str]) -> None:
        """Squares and histograms add up to the figures of round 1 only from the same silos (one that dropped out
        at round 2's deadline would leave its rows counted and not binned)."""
        with self._db.read() as session:
            first = set(
                session.scalars(select(Update.silo_id).where(Update.job_id == self._job_id, Update.round_number == 1))
            )
        if silos != first:
            raise AggregationError(
                f"the silos releasing in round 2 ({len(silos)}) are not those of round 1 ({len(first)}): the "
                "figures would not add up (every silo of round 1 must release in round 2)"
            )

    def _silo_names(self, ids: list[str]) -> dict[str, str]:
        with self._db.read() as session:
            return {
                silo_id: name for silo_id, name in session.execute(select(Silo.id, Silo.name).where(Silo.id.in_(ids)))
            }

    def _side_file(self) -> Path:
        return self._artifacts.checkpoint_path(self._job_id, 1).with_name("per-silo-round-1.safetensors")

    def _write(self, path: Path, tensors: dict[str, Array]) -> tuple[int, str]:
        order = sorted(tensors)
        specs = [TensorSpec(name, "F64", tuple(tensors[name].shape)) for name in order]
        with atomic_write(path, reuse=self._artifacts.claim_pooled()) as f:
            writer = HashingWriter(f)
            write_safetensors(writer, specs, (tensors[name] for name in order))
        return path.stat().st_size, writer.hexdigest()
