"""Figures of a regression on held-out rows: MSE loss, MAE, RMSE and R^2, each with its sample count and a seeded
bootstrap 95% interval (the naming scheme of fedmeki_core.tasks.confidence: `X`, `X.n`, `X.lo`, `X.hi`).

The interval is the percentile bootstrap over rows: the figure recomputed on BOOTSTRAP_RESAMPLES resamples of the
rows drawn with replacement, deterministic for the seed. R^2 is 1 - SSE / SST against the held-out rows' own mean;
it is undefined (left out) when every target is the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmeki_core.tasks.confidence import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, HI, LO, N

Array = np.ndarray[Any, Any]
REGRESSION_FIGURES = ("mae", "rmse", "r2")
_CHUNK = 50  # resamples drawn at once: memory stays O(_CHUNK x rows)


def _figures(predictions: Array, targets: Array) -> dict[str, Array]:
    """mae, rmse and r2 of each row of [R, N] predictions against [R, N] targets (r2 NaN where SST is 0)."""
    errors = predictions - targets
    sse = (errors**2).sum(axis=1)
    sst = ((targets - targets.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(sst > 0, 1.0 - sse / np.where(sst > 0, sst, 1.0), np.nan)
    return {"mae": np.abs(errors).mean(axis=1), "rmse": np.sqrt(sse / errors.shape[1]), "r2": r2}


def regression_metrics(
    predictions: Array, targets: Array, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> dict[str, float]:
    """`loss` (the MSE) and mae, rmse, r2 with counts and bootstrap intervals; nothing but the loss of no rows."""
    predictions = np.asarray(predictions, dtype=np.float64).reshape(-1)
    targets = np.asarray(targets, dtype=np.float64).reshape(-1)
    n = len(targets)
    if n == 0:
        return {"loss": 0.0}
    point = {name: float(value[0]) for name, value in _figures(predictions[None], targets[None]).items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[Array]] = {name: [] for name in REGRESSION_FIGURES}
    for start in range(0, resamples, _CHUNK):
        rows = rng.integers(0, n, (min(_CHUNK, resamples - start), n))
        for name, values in _figures(predictions[rows], targets[rows]).items():
            draws[name].append(values)
    metrics = {"loss": point["rmse"] ** 2}
    for name in REGRESSION_FIGURES:
        values = np.concatenate(draws[name])
        values = values[np.isfinite(values)]  # resamples whose targets are all equal have no R^2
        if not np.isfinite(point[name]) or values.size == 0:
            continue
        lo, hi = np.percentile(values, [2.5, 97.5])
        metrics |= {name: point[name], name + N: float(n), name + LO: float(lo), name + HI: float(hi)}
    return metrics
