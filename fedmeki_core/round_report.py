"""A job's metrics round by round, per task and per silo: the rows behind `fedmeki job report`'s table and exports.

One row per round, task and silo (a silo's own scores on its held-out data) or "all" (the coordinator's
sample-weighted mean of them). A training round's eval_* metrics score the checkpoint it starts from, evaluated
before training, so round r scores checkpoint r - 1; the final evaluation round scores the last checkpoint.
Injection rows (kind "inject") score checkpoint `round` with the injector's test data. Of a suite, each task's row
holds its `<task>.` metrics without the prefix.

Beside an accuracy stand the held-out samples it was measured on (`eval_samples`, which silos report) and its 95%
Wilson interval; the "all" row's interval is that of the pooled held-out proportion (every silo's correct answers
over every silo's held-out samples), while its value stays the coordinator's mean weighted by training samples.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace

from fedmeki_core.records import JobStatus, RoundKind, RoundSummary
from fedmeki_core.tasks import SUITES, get_task
from fedmeki_core.tasks.metrics import EVAL_SAMPLES, wilson_interval

ALL = "all"


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
    held_out: int | None = None  # the held-out samples `value` was measured on, where the silos said
    ci_low: float | None = None  # the 95% Wilson interval of an accuracy
    ci_high: float | None = None


def round_rows(job: JobStatus) -> list[MetricRow]:
    """Every round's rows in round order: per task, "all" first, then each silo by name."""
    names = SUITES[job.spec.task].tasks if job.spec.task in SUITES else (job.spec.task,)
    rows = []
    for summary in sorted((*job.rounds, *job.injections), key=lambda s: (s.number, s.kind == RoundKind.INJECT)):
        for name in names:
            rows.extend(_task_rows(summary, name, len(names) > 1))
    return rows


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
        own = _task_metrics(metrics, task, several)
        if own:
            value, counted = own.get(headline), own.get(EVAL_SAMPLES)
            rows.append(
                _with_interval(
                    MetricRow(summary.number, str(summary.kind), checkpoint, task, silo, samples, metric, value, own),
                    value,
                    None if counted is None else int(counted),
                )
            )
    silos = [row for row in rows if row.silo != ALL]
    if rows and rows[0].silo == ALL and silos and all(r.held_out and r.value is not None for r in silos):
        held_out = sum(r.held_out or 0 for r in silos)
        pooled = sum((r.value or 0.0) * (r.held_out or 0) for r in silos) / held_out
        rows[0] = _with_interval(rows[0], pooled, held_out)
    return rows


def _with_interval(row: MetricRow, proportion: float | None, samples: int | None) -> MetricRow:
    """The row with its held-out count and, for an accuracy, the Wilson interval of `proportion` on them."""
    if samples is None:
        return row
    if row.metric != "accuracy" or proportion is None:
        return replace(row, held_out=samples)
    low, high = wilson_interval(proportion, samples)
    return replace(row, held_out=samples, ci_low=low, ci_high=high)


def _task_metrics(metrics: dict[str, float], task: str, several: bool) -> dict[str, float]:
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
    """The headline metric per round and task (and silo when `per_silo`), with the held-out samples it was measured
    on and its 95% interval, aligned for a terminal."""
    shown = [row for row in rows if per_silo or row.silo == ALL or row.kind == RoundKind.INJECT]
    lines = [
        f"{'round':>5} {'kind':<8} {'ckpt':>4} {'task':<28} {'silo':<16} {'samples':>7} {'metric':<9} {'value':<6} "
        f"{'held-out':>8} 95% CI"
    ]
    for row in shown:
        samples = "-" if row.samples is None else str(row.samples)
        value = "-" if row.value is None else f"{row.value:.4f}"
        held_out = "-" if row.held_out is None else str(row.held_out)
        interval = "-" if row.ci_low is None or row.ci_high is None else f"{row.ci_low:.3f}-{row.ci_high:.3f}"
        lines.append(
            f"{row.round:>5} {row.kind:<8} {row.checkpoint:>4} {row.task:<28} {row.silo:<16} {samples:>7} "
            f"{row.metric:<9} {value:<6} {held_out:>8} {interval}"
        )
    return "\n".join(lines)
