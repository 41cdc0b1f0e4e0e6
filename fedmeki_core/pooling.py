"""The federation's figures pooled from the silos' held-out counts (the report's "all" rows).

A proportion is pooled from its successes and counts (sum of value x n over sum of n) with the Wilson interval
of the pooled counts; the reliability table bin by bin, and the ECE from the pooled table (where a silo sent no
table, the held-out-weighted mean of the silos' ECEs, which is never below the pooled ECE). An AUC is not pooled:
the AUC of the pooled data needs every score, which stays at the silos; it and its bootstrap interval are shown per
silo only. Of a regression, MAE is pooled as the held-out-weighted mean and RMSE from the pooled squared error,
both without an interval (a bootstrap needs every row); R^2 is not pooled: it needs the pooled rows' own variance.
Figures outside the naming scheme of fedmeki_core.tasks.confidence are left to the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedmeki_core.tasks.confidence import (
    BOOTSTRAPPED,
    CALIBRATION,
    PROPORTIONS,
    N,
    expected_calibration_error,
    proportion,
    successes_of,
)


def _base(key: str) -> str:
    """`personal_eval_accuracy` -> `accuracy`; `accuracy` -> `accuracy`."""
    return key.rpartition("_")[2]


def _is_bin(key: str) -> bool:
    return f"{CALIBRATION}." in key


def _figures(keys: set[str]) -> set[str]:
    """The figures that carry a count (`X` of each `X.n`)."""
    return {key.removesuffix(N) for key in keys if key.endswith(N) and not _is_bin(key)}


def scheme_keys(keys: set[str]) -> set[str]:
    """The keys of `keys` that the naming scheme pools (or, for AUC, leaves per silo): figures with a count, their
    counts and bounds, and reliability bins."""
    figures = _figures(keys)
    return {key for key in keys if _is_bin(key) or key in figures or key.rpartition(".")[0] in figures}


def pooled(silos: Sequence[dict[str, float]]) -> dict[str, float]:
    """The pooled figures of the silos' metrics (each silo's own, without a task prefix)."""
    keys: set[str] = set().union(*silos) if silos else set()
    figures = sorted(_figures(keys))
    metrics: dict[str, float] = {}
    for figure in figures:
        base = _base(figure)
        counted = [m for m in silos if figure in m and figure + N in m]
        if base in PROPORTIONS:
            successes = sum(successes_of(m[figure], m[figure + N]) for m in counted)
            metrics |= proportion(figure, successes, sum(round(m[figure + N]) for m in counted))
        elif base == "rmse":
            total = sum(m[figure + N] for m in counted)
            if total > 0:
                squares = sum(m[figure] ** 2 * m[figure + N] for m in counted)
                metrics |= {figure: (squares / total) ** 0.5, figure + N: total}
        elif base == "ece":
            metrics |= _pooled_calibration(figure.removesuffix("ece"), counted)
        elif base not in BOOTSTRAPPED and base != "r2":
            total = sum(m[figure + N] for m in counted)
            if total > 0:  # a figure without an interval: its held-out-weighted mean
                metrics |= {figure: sum(m[figure] * m[figure + N] for m in counted) / total, figure + N: total}
    return metrics


def reliability_bins(metrics: dict[str, float], prefix: str = "eval_") -> list[tuple[int, int, int, float]]:
    """(bin, samples, positives, mean predicted probability) of each reliability bin in `metrics`."""
    head = f"{prefix}{CALIBRATION}."
    bins = sorted({int(key[len(head) :].split(".")[0]) for key in metrics if key.startswith(head)})
    return [
        (k, round(metrics[f"{head}{k}.n"]), round(metrics[f"{head}{k}.positives"]), metrics[f"{head}{k}.predicted"])
        for k in bins
    ]


def _pooled_calibration(prefix: str, silos: Sequence[dict[str, float]]) -> dict[str, float]:
    """`<prefix>ece`, its count and, where every silo sent its table, the pooled table."""
    total = sum(m[f"{prefix}ece{N}"] for m in silos)
    if total <= 0:
        return {}
    tables = [reliability_bins(m, prefix) for m in silos]
    if not all(tables):
        mean = sum(m[f"{prefix}ece"] * m[f"{prefix}ece{N}"] for m in silos) / total
        return {f"{prefix}ece": mean, f"{prefix}ece{N}": total}
    sums: dict[int, tuple[int, int, float]] = {}
    for table in tables:
        for k, count, positives, predicted in table:
            n, p, s = sums.get(k, (0, 0, 0.0))
            sums[k] = (n + count, p + positives, s + predicted * count)
    merged = {k: (n, p, s / n) for k, (n, p, s) in sorted(sums.items())}
    ece = expected_calibration_error(list(merged.values()))
    metrics = {f"{prefix}ece": ece or 0.0, f"{prefix}ece{N}": total}
    for k, (n, p, mean) in merged.items():
        head = f"{prefix}{CALIBRATION}.{k}."
        metrics |= {head + "n": float(n), head + "positives": float(p), head + "predicted": mean}
    return metrics
