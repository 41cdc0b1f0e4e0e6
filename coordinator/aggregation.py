"""Streaming accumulation of a round's deltas: one weighted running sum per tensor, O(model) memory.

Each accepted update is folded in once (idempotent per silo), tensor by tensor, read from its spooled
file through a memory map, so the coordinator never holds more than the sum and one tensor of one update.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from fedmeki_core.algorithms import ServerAlgorithm
from fedmeki_core.wire import TensorSpec


class RoundAccumulator:
    def __init__(self, manifest: list[TensorSpec]) -> None:
        self._manifest = manifest
        self._sums: dict[str, np.ndarray[Any, Any]] = {}
        self._total_weight = 0.0
        self._folded: set[str] = set()
        self._lock = threading.Lock()

    @property
    def folded(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._folded)

    def fold(self, silo_id: str, update_path: Path, weight: float) -> None:
        """Add `weight` times the update's tensors to the running sums, unless this silo is already in."""
        with self._lock:
            if silo_id in self._folded:
                return
            with safe_open(str(update_path), framework="numpy") as update:
                for spec in self._manifest:
                    delta = update.get_tensor(spec.name)
                    if spec.name not in self._sums:
                        self._sums[spec.name] = np.zeros(spec.shape, dtype=delta.dtype)
                    self._sums[spec.name] += delta * np.asarray(weight, dtype=delta.dtype)
            self._total_weight += weight
            self._folded.add(silo_id)

    def next_global(self, current_checkpoint: Path, server: ServerAlgorithm) -> Iterator[np.ndarray[Any, Any]]:
        """The next global tensors in manifest order: the server half applied to the weighted mean delta.

        Consumes the sums (each is turned into its result in place) so peak memory stays at one model.
        """
        if self._total_weight <= 0:
            raise ValueError("no update has been folded into this round")
        with self._lock, safe_open(str(current_checkpoint), framework="numpy") as current:
            for spec in self._manifest:
                mean_delta = self._sums.pop(spec.name)
                mean_delta /= np.asarray(self._total_weight, dtype=mean_delta.dtype)
                yield server.apply(spec.name, current.get_tensor(spec.name), mean_delta)
