"""A synthetic hospital table (task tabular): standardised features, a logistic rule shared by all silos.

Each silo sees its own label balance and its own shift of the features, so no silo's table looks like the whole
population; the label follows one hidden linear rule with noise, so a logistic regression fits it and federation
helps the silos with few cases of a class.
"""

from __future__ import annotations

import numpy as np

from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import ArrayDataset

_RULE_SEED = 20261206  # the population's rule: the same for every silo


def generate(
    num_samples: int, silo_index: int, num_silos: int, seed: int = 0, image_size: int | None = None
) -> ArrayDataset:
    """`num_samples` rows for silo `silo_index` of `num_silos`; `image_size` is the table's width (num_features)."""
    width = image_size or TASKS["tabular"].input_shape[0]
    weights = np.random.default_rng(_RULE_SEED).normal(size=width)
    rng = np.random.default_rng([seed, silo_index])
    positive_share = 0.2 + 0.6 * (silo_index + 0.5) / max(num_silos, 1)  # label skew across silos
    labels = (rng.random(num_samples) < positive_share).astype(np.int64)
    direction = weights / np.linalg.norm(weights)
    shift = rng.normal(scale=0.2, size=width)  # each silo's population differs a little
    features = rng.normal(size=(num_samples, width)) + shift + 1.5 * (2.0 * labels - 1.0)[:, None] * direction
    return ArrayDataset(features.astype(np.float32), labels)
