"""Synthetic ICU-style vitals with a deterioration label, non-IID across silos.

All silos share one hidden rule (a trend in some vitals plus a level in others decides the label), so
federation helps; each silo sees its own label balance and its own measurement offset, so no silo's
data looks like the whole population.
"""

from __future__ import annotations

import numpy as np

from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import ArrayDataset

_INFO = TASKS["synthetic-vitals"]
_RULE_SEED = 20241209  # the population's rule: the same for every silo


def generate(num_samples: int, silo_index: int, num_silos: int, seed: int = 0) -> ArrayDataset:
    """`num_samples` samples for silo `silo_index` of `num_silos`."""
    steps, channels = _INFO.input_shape
    rule = np.random.default_rng(_RULE_SEED)
    level_weights = rule.normal(size=channels)
    trend_weights = rule.normal(size=channels)
    rng = np.random.default_rng([seed, silo_index])
    # Label skew: silos range from mostly-negative to mostly-positive populations.
    positive_share = 0.2 + 0.6 * (silo_index + 0.5) / max(num_silos, 1)
    labels = (rng.random(num_samples) < positive_share).astype(np.int64)
    sign = 2.0 * labels - 1.0
    time = np.linspace(-1.0, 1.0, steps, dtype=np.float32)
    level = rng.normal(size=(num_samples, channels)) + 0.6 * sign[:, None] * level_weights
    trend = rng.normal(scale=0.5, size=(num_samples, channels)) + 0.6 * sign[:, None] * trend_weights
    noise = rng.normal(scale=0.8, size=(num_samples, steps, channels))
    offset = rng.normal(scale=0.3, size=channels)  # each silo's devices read a little differently
    features = level[:, None, :] + trend[:, None, :] * time[None, :, None] + noise + offset
    return ArrayDataset(features.astype(np.float32), labels)
