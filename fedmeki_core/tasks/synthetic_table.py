"""A synthetic hospital table (tasks tabular, tabular-multiclass, tabular-regression): standardised features and a
rule shared by all silos (logistic, class centres, or linear with noise).

Each silo sees its own label balance and its own shift of the features, so no silo's table looks like the whole
population; the label follows one hidden linear rule with noise, so a logistic regression fits it and federation
helps the silos with few cases of a class.
"""

from __future__ import annotations

import numpy as np

from fedmeki_core.tasks.catalog import TASKS
from fedmeki_core.tasks.dataset import ArrayDataset

_RULE_SEED = 20261206  # the population's rule: the same for every silo


MULTICLASS_CLASSES = 3  # the synthetic tabular-multiclass table's classes


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


def generate_multiclass(
    num_samples: int, silo_index: int, num_silos: int, seed: int = 0, image_size: int | None = None
) -> ArrayDataset:
    """`num_samples` rows of MULTICLASS_CLASSES classes, each class centred on its own direction; each silo holds
    its own mix of the classes (the first silo mostly class 0, the last mostly the last class)."""
    width = image_size or TASKS["tabular-multiclass"].input_shape[0]
    centres = np.random.default_rng(_RULE_SEED + 1).normal(size=(MULTICLASS_CLASSES, width))
    centres *= 2.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, silo_index])
    mix = np.ones(MULTICLASS_CLASSES)
    mix[round(silo_index * (MULTICLASS_CLASSES - 1) / max(num_silos - 1, 1))] += 2.0  # class skew
    labels = rng.choice(MULTICLASS_CLASSES, size=num_samples, p=mix / mix.sum()).astype(np.int64)
    features = rng.normal(size=(num_samples, width)) + centres[labels]
    return ArrayDataset(features.astype(np.float32), labels)


def generate_regression(
    num_samples: int, silo_index: int, num_silos: int, seed: int = 0, image_size: int | None = None
) -> ArrayDataset:
    """`num_samples` rows whose target is one hidden linear rule of the features plus unit noise (R^2 about 0.8);
    each silo's features are shifted along the rule, so its targets' range differs from the others'."""
    width = image_size or TASKS["tabular-regression"].input_shape[0]
    direction = np.random.default_rng(_RULE_SEED + 2).normal(size=width)
    direction /= np.linalg.norm(direction)
    rng = np.random.default_rng([seed, silo_index])
    shift = (silo_index - (num_silos - 1) / 2) * direction  # covariate skew across silos
    features = rng.normal(size=(num_samples, width)) + shift
    targets = 2.0 * features @ direction + rng.normal(size=num_samples)  # signal variance 4, noise 1
    return ArrayDataset(
        features.astype(np.float32), np.full(num_samples, -1, dtype=np.int64), targets=targets.astype(np.float32)
    )
