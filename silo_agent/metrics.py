"""AgentMetrics: what a silo agent tells Prometheus: its device, and the speed of its local training.

Only timings and counts: nothing about the data beyond how many samples were trained on.
Served on the agent's `metrics_address` when it is set.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_STEP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TRAINING_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class AgentMetrics:
    def __init__(self, device: str) -> None:
        self.registry = CollectorRegistry()
        Info("fedmeki_silo_device", "The device this agent trains on", registry=self.registry).info({"device": device})
        self.step_seconds = Histogram(
            "fedmeki_silo_training_step_seconds",
            "Time between consecutive optimiser steps of local training",
            buckets=_STEP_BUCKETS,
            registry=self.registry,
        )
        self.training_seconds = Histogram(
            "fedmeki_silo_training_seconds",
            "Wall time of a round's local training, with its evaluation of the global model and the delta written",
            buckets=_TRAINING_BUCKETS,
            registry=self.registry,
        )
        self.trained_samples = Counter(
            "fedmeki_silo_trained_samples", "Samples trained on, times local epochs", registry=self.registry
        )
        self.samples_per_second = Gauge(
            "fedmeki_silo_training_samples_per_second",
            "The last round's samples times local epochs over its training wall time",
            registry=self.registry,
        )
        self._last_step: float | None = None

    def step(self, number: int) -> None:
        """After each optimiser step; `number` starts at 1 with each task's training, whose first step is not
        timed (what came before it, loading and evaluation, is not a step)."""
        now = time.monotonic()
        if number > 1 and self._last_step is not None:
            self.step_seconds.observe(now - self._last_step)
        self._last_step = now

    def trained(self, samples: int, seconds: float) -> None:
        self.trained_samples.inc(samples)
        self.training_seconds.observe(seconds)
        self.samples_per_second.set(samples / seconds if seconds > 0 else 0.0)
