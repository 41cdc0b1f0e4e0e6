"""Each open round's running sum (`RoundAccumulator`), and the thread that folds received updates into it."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coordinator.aggregation import RoundAccumulator
from coordinator.credentials import SiloIdentity
from coordinator.rounds import central_dp
from coordinator.sum_buffers import SumBuffers
from fedmeki_core.algorithms.robust import RobustAggregation
from fedmeki_core.algorithms.update_limits import update_limits
from fedmeki_core.encodings import DeltaEncoding
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.wire import TensorSpec

logger = logging.getLogger(__name__)


class RunningSums:
    """In memory only: after a restart, aggregation folds every recorded update from its file."""

    def __init__(self, buffers: SumBuffers | None = None, running_sum_bytes: int | None = None) -> None:
        self._buffers = buffers or SumBuffers(0)
        self._running_sum_bytes = running_sum_bytes  # None: every round keeps running sums
        self._accumulators: dict[tuple[str, int], RoundAccumulator] = {}
        self._accumulators_lock = threading.Lock()
        # Folds run after the receipt is sent; aggregation folds whatever is not folded yet (idempotent).
        self._folder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedmeki-fold")

    def accumulator(
        self,
        job_id: str,
        round_number: int,
        manifest: list[TensorSpec],
        spec: JobSpec,
        selected: list[str],
        robust: RobustAggregation | None,
    ) -> RoundAccumulator:
        with self._accumulators_lock:
            key = (job_id, round_number)
            if key not in self._accumulators:
                cap = update_limits(spec.algorithm.options).max_silo_weight
                encoding = DeltaEncoding.of(spec)
                self._accumulators[key] = RoundAccumulator(
                    manifest, selected, central_dp(spec), robust, cap, encoding, self._buffers, self._running_sum_bytes
                )
            return self._accumulators[key]

    def fold_later(self, accumulator: RoundAccumulator, silo: SiloIdentity, path: Path, weight: float) -> None:
        self._folder.submit(self._fold_in_background, accumulator, silo, path, weight)

    def _fold_in_background(self, accumulator: RoundAccumulator, silo: SiloIdentity, path: Path, weight: float) -> None:
        try:
            accumulator.offer(silo.id, path, weight)
        except Exception:  # aggregation folds it again from the same file and reports what goes wrong
            logger.exception("folding the update of silo %s failed; aggregation will retry it", silo.name)

    def drop(self, job_id: str, round_number: int) -> None:
        # Writing the checkpoint consumes the sums: a retry (after a full disk, say) folds the files anew.
        with self._accumulators_lock:
            dropped = self._accumulators.pop((job_id, round_number), None)
        if dropped is not None:
            dropped.release()

    def forget(self, job_id: str) -> None:
        with self._accumulators_lock:
            dropped = [self._accumulators.pop(k) for k in list(self._accumulators) if k[0] == job_id]
        for accumulator in dropped:
            accumulator.release()

    def shutdown(self) -> None:
        self._folder.shutdown(wait=True)
