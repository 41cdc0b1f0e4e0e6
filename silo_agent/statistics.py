"""The silo's half of a statistics job (its "training": a release of its table's figures), and the normaliser a
training job takes from one.

The release goes up as a safetensors update in the job's layout (fedmeki_core/statistics.py); what the minimum
cell count held back is logged with its reason and counted in the update's metrics. The header's sample count is
1 for every silo: the figures travel in the tensors, and a suppressed silo's row count must not leak beside them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.files import HashingWriter, atomic_write
from fedmeki_core.jobspec_statistics import NormaliseSpec
from fedmeki_core.records import RoundTask
from fedmeki_core.statistics import layout, release
from fedmeki_core.tasks import get_task
from fedmeki_core.tasks.dataset import ArrayDataset, load_dataset
from fedmeki_core.wire import iter_tensors, write_safetensors

logger = logging.getLogger(__name__)


class StatisticsRelease:
    """Computes a silo's release for a round of a statistics job from the whole of its table."""

    def __init__(self, data: Mapping[str, Path], floor: int) -> None:
        self._data = dict(data)
        self._floor = floor  # silo.yaml's minimum cell count: a job may ask for more, never less

    def write(
        self, task: RoundTask, checkpoint: Path, out: Path, reuse: Path | None, clip_to_edges: bool = False
    ) -> tuple[str, dict[str, float]]:
        """Write the round's release to `out`; (its sha256, its metrics). `clip_to_edges`: the release is summed
        under CKKS (values clipped to the declared edges, no min/max)."""
        statistics = task.spec.statistics
        assert statistics is not None
        published = {spec.name: np.array(value, dtype=np.float64) for spec, value in iter_tensors(checkpoint)}
        rng = np.random.default_rng(secrets.randbits(128))  # fresh OS entropy: the noise must not be guessable
        data = self._table(task).features
        result = release(statistics, task.round, data, published, self._floor, rng, clip_to_edges=clip_to_edges)
        for reason in result.suppressed:
            logger.info("job %s round %d: not released: %s", task.job_id, task.round, reason)
        order = layout(statistics)
        with atomic_write(out, reuse) as f:
            writer = HashingWriter(f)
            write_safetensors(writer, order, (result.tensors[spec.name] for spec in order))
        metrics = {
            "statistics_suppressed_features": float(len(statistics.features) - int(result.tensors["released"].sum()))
            if task.round == 1
            else 0.0,
            "statistics_suppressed_bins": float(result.tensors["suppressed_bins"].sum()),
        }
        if statistics.dp is not None:
            metrics["dp_epsilon"] = statistics.dp.epsilon / 2 * task.round  # spent so far: half the job's per round
        return writer.hexdigest(), metrics

    def _table(self, task: RoundTask) -> ArrayDataset:
        statistics = task.spec.statistics
        assert statistics is not None
        name = task.spec.task
        if name not in self._data:
            raise InvalidInputError(f"this silo has no data for task {name!r}")
        return load_dataset(self._data[name], get_task(name), len(statistics.features))


def normalised(spec: NormaliseSpec | None, splits: tuple[ArrayDataset, ArrayDataset]) -> tuple[ArrayDataset, ...]:
    """The (train, held-out) split standardised with a statistics job's figures, or as it is without them."""
    if spec is None:
        return splits
    mean = np.array(spec.mean, dtype=np.float32)
    std = np.array(spec.std, dtype=np.float32)
    if splits[0].features.shape[1:] != mean.shape:
        raise InvalidInputError(
            f"this silo's table has {splits[0].features.shape[1:]} encoded columns; the normaliser has {mean.size}"
        )
    return tuple(replace(split, features=(split.features - mean) / std) for split in splits)
