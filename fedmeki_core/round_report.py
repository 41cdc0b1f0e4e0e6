"""A job's metrics round by round, per task and per silo: the rows behind `fedmeki job report`'s table and exports.

One row per round, task and silo (a silo's own scores on its held-out data) or "all": the figures that carry a
held-out count pooled from the silos' counts (fedmeki_core.pooling: proportions from pooled successes with their
Wilson interval, AUC per silo only), the others the coordinator's sample-weighted mean. `samples` is what the
round's silos reported (training samples for a training round, held-out samples for the final evaluation);
`held_out`, `ci_low` and `ci_high` are the headline figure's held-out count and 95% interval.
A training round's eval_* metrics score the checkpoint it starts from, evaluated before
training, so round r scores checkpoint r - 1; the final evaluation round scores the last checkpoint.
Injection rows (kind "inject") score checkpoint `round` with the injector's test data; evaluator rows (kind
"evaluator", after the rounds') score checkpoint `round` with the job's evaluator silo's held-out set, which no silo
trains on. Of a suite, each task's row holds its `<task>.` metrics without the prefix.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

from fedmeki_core.pooling import pooled, scheme_keys
from fedmeki_core.records import JobStatus, RoundKind, RoundSummary, SiloResult
from fedmeki_core.tasks import SUITES, get_task
from fedmeki_core.tasks.confidence import HI, LO, N

ALL = "all"
EVALUATOR = "evaluator"  # the kind of the evaluator silo's rows


@dataclass(frozen=True)
class MetricRow:
    round: int
    kind: str
    checkpoint: int  # the checkpoint that `value` and the eval_* metrics score
    task: str
    silo: str  # a silo's name, the injector's, or ALL
    samples: int | None  # None where no silo reported a count (injections)
    metric: str  # the task's headline metric
    value: float | None
    metrics: dict[str, float]  # every metric of this task in this row
    held_out: int | None = None  # the held-out samples `value` was computed on, where the silos reported it
    ci_low: float | None = None  # the 95% interval of `value`, where it has one
    ci_high: float | None = None


def round_rows(job: JobStatus) -> list[MetricRow]:
    """Every round's rows in round order: per task, "all" first, then each silo by name."""
    names = SUITES[job.spec.task].tasks if job.spec.task in SUITES else (job.spec.task,)
    rows = []
    for summary in sorted((*job.rounds, *job.injections), key=lambda s: (s.number, s.kind == RoundKind.INJECT)):
        for name in names:
            rows.extend(_task_rows(summary, name, len(names) > 1))
    for summary in job.evaluations:
        for result in summary.silo_results:  # one, once the evaluator has scored the checkpoint
            for name in names:
                own = task_metrics(result.metrics, name, len(names) > 1)
                metric = get_task(name).metric
                if own:
                    rows.append(_row(summary.number, EVALUATOR, summary.number, name, result, metric, own))
    return rows


def _row(
    number: int, kind: str, checkpoint: int, task: str, result: SiloResult, metric: str, own: dict[str, float]
) -> MetricRow:
    headline = f"eval_{metric}"
    held_out, lo, hi = own.get(headline + N), own.get(headline + LO), own.get(headline + HI)
    held = None if held_out is None else round(held_out)
    return MetricRow(
        number, kind, checkpoint, task, result.silo, result.num_samples, metric, own.get(headline), own, held, lo, hi
    )


def _task_rows(summary: RoundSummary, task: str, several: bool) -> list[MetricRow]:
    metric = get_task(task).metric
    inject = summary.kind == RoundKind.INJECT
    checkpoint = summary.number if inject else summary.number - 1
    headline = metric if inject else f"eval_{metric}"
    sources: list[tuple[str, int | None, dict[str, float]]]
    if inject:  # the injector's scores; suite keys are prefixed even for one task
        sources = [(summary.reported_silos[0] if summary.reported_silos else ALL, None, summary.metrics)]
        several = True
    else:
        total = sum(r.num_samples for r in summary.silo_results)
        sources = [(ALL, total, summary.metrics), *((r.silo, r.num_samples, r.metrics) for r in summary.silo_results)]
    rows = []
    for silo, samples, metrics in sources:
        own = (
            all_metrics(summary, task, several) if silo == ALL and not inject else task_metrics(metrics, task, several)
        )
        if own:
            held_out, lo, hi = own.get(headline + N), own.get(headline + LO), own.get(headline + HI)
            rows.append(
                MetricRow(
                    summary.number,
                    str(summary.kind),
                    checkpoint,
                    task,
                    silo,
                    samples,
                    metric,
                    own.get(headline),
                    own,
                    None if held_out is None else round(held_out),
                    lo,
                    hi,
                )
            )
    return rows


def all_metrics(summary: RoundSummary, task: str, several: bool) -> dict[str, float]:
    """A task's metrics of the whole round: the coordinator's means, with the figures that carry held-out counts
    pooled from the silos' own instead (and an AUC, which cannot be pooled, left out)."""
    silos = [task_metrics(result.metrics, task, several) for result in summary.silo_results]
    silos = [metrics for metrics in silos if metrics]
    means = task_metrics(summary.metrics, task, several)
    counted = scheme_keys(set(means).union(*silos))
    return {key: value for key, value in means.items() if key not in counted} | pooled(silos)


def task_metrics(metrics: dict[str, float], task: str, several: bool) -> dict[str, float]:
    if not several:
        return dict(metrics)
    prefix = f"{task}."
    return {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}


_COLUMNS = (
    "round",
    "kind",
    "checkpoint",
    "task",
    "silo",
    "samples",
    "metric",
    "value",
    "held_out",
    "ci_low",
    "ci_high",
)


def rows_csv(rows: list[MetricRow]) -> str:
    """The rows as CSV: the fixed columns, then one column per metric name (empty where a row lacks it)."""
    names = sorted({key for row in rows for key in row.metrics})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_COLUMNS, *names])
    for row in rows:
        fixed = [getattr(row, column) for column in _COLUMNS]
        writer.writerow(["" if v is None else v for v in fixed] + [row.metrics.get(name, "") for name in names])
    return out.getvalue()


def rows_json(job: JobStatus, rows: list[MetricRow]) -> str:
    return json.dumps(
        {
            "job": job.id,
            "name": job.spec.name,
            "task": job.spec.task,
            "state": str(job.state),
            "rows": [{**{c: getattr(row, c) for c in _COLUMNS}, "metrics": row.metrics} for row in rows],
        },
        indent=2,
    )


def rows_table(rows: list[MetricRow], per_silo: bool) -> str:
    """The headline metric per round and task (and silo when `per_silo`), with the held-out samples it was computed
    on and its 95% interval, aligned for a terminal."""
    shown = [row for row in rows if per_silo or row.silo == ALL or row.kind in (RoundKind.INJECT, EVALUATOR)]
    lines = [
        f"{'round':>5} {'kind':<8} {'ckpt':>4} {'task':<28} {'silo':<16} {'samples':>7} {'metric':<9} {'value':<7}"
        f" {'held-out':>8} 95% interval"
    ]
    for row in shown:
        samples = "-" if row.samples is None else str(row.samples)
        value = "-" if row.value is None else f"{row.value:.4f}"
        held_out = "-" if row.held_out is None else str(row.held_out)
        lines.append(
            f"{row.round:>5} {row.kind:<8} {row.checkpoint:>4} {row.task:<28} {row.silo:<16} {samples:>7} "
            f"{row.metric:<9} {value:<7} {held_out:>8} {interval(row.ci_low, row.ci_high)}"
        )
    lines.append(
        "samples: what the silos trained on in a train round (its metrics are on their held-out data, scored "
        "before training), what they scored in the evaluate round; evaluator rows: the evaluator silo's held-out set"
    )
    return "\n".join(lines)


def interval(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None or hi is None else f"[{lo:.3f}, {hi:.3f}]"
