"""A job's per-task table: the federated model and the injected foundation model, first round against last.

"federated": the job's own model (the encoders with their heads, or in the federated-injection mode the
injection model answering in text), scored by the silos on their held-out data (round 1's silos evaluate
checkpoint 0 before training; the final evaluation round scores the last checkpoint). Injected-model scores come
from the injector's test data (injection 0 is the untrained baseline on checkpoint 0; the last injection uses the
final encoders). Beside the last figure of each: the held-out samples it was computed on and its 95% interval
(the federated figure pooled across the silos, fedmeki_core.pooling), and for a binary task the final model's
pooled reliability table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmeki_core.pooling import reliability_bins
from fedmeki_core.records import JobStatus, RoundKind, RoundState, RoundSummary
from fedmeki_core.round_report import all_metrics, interval, task_metrics
from fedmeki_core.tasks import SUITES, LabelType, get_task
from fedmeki_core.tasks.confidence import CALIBRATION_BINS, HI, LO, THRESHOLD, N

Spread = tuple[int | None, float | None, float | None]  # (held-out samples, interval low, interval high)


@dataclass(frozen=True)
class TaskRow:
    task: str
    modality: str
    role: str
    metric: str
    federated: tuple[float | None, float | None]  # (round 0, last round)
    injected: tuple[float | None, float | None]  # (injection 0, last injection)
    injected_rounds: tuple[int, int] | None  # which checkpoints the injected columns come from
    federated_spread: Spread = (None, None, None)  # of the last federated figure
    injected_spread: Spread = (None, None, None)  # of the last injected figure
    reliability: tuple[tuple[int, int, int, float], ...] = ()  # the final model's pooled (bin, n, positives, mean p)
    final: dict[str, float] = field(default_factory=dict)  # the final model's pooled figures
    final_silos: tuple[tuple[str, dict[str, float]], ...] = ()  # the final model's figures at each silo


def task_report(job: JobStatus) -> list[TaskRow]:
    names = SUITES[job.spec.task].tasks if job.spec.task in SUITES else (job.spec.task,)
    several = len(names) > 1
    committed = [r for r in job.rounds if r.state == RoundState.COMMITTED]
    first_train = next((r for r in committed if r.kind == RoundKind.TRAIN), None)
    final = next((r for r in reversed(committed) if r.kind == RoundKind.EVALUATE), None)
    injections = [r for r in job.injections if r.state == RoundState.COMMITTED]
    first_injection, last_injection = (injections[0], injections[-1]) if injections else (None, None)
    rows = []
    for name in names:
        info = get_task(name)
        key = f"eval_{info.metric}"
        first, last = (_pooled(summary, name, several) for summary in (first_train, final))
        injected_first, injected_last = (_injected(summary, name) for summary in (first_injection, last_injection))
        binary = info.label_type == LabelType.BINARY
        rows.append(
            TaskRow(
                task=name,
                modality=str(info.modality),
                role=str(info.role),
                metric=info.metric,
                federated=(first.get(key), last.get(key)),
                injected=(injected_first.get(info.metric), injected_last.get(info.metric)),
                injected_rounds=(first_injection.number, last_injection.number)
                if first_injection and last_injection
                else None,
                federated_spread=_spread(last, key),
                injected_spread=_spread(injected_last, info.metric),
                reliability=tuple(reliability_bins(last)) if binary else (),
                final=last if binary else {},
                final_silos=_per_silo(final, name, several) if binary else (),
            )
        )
    return rows


def _pooled(summary: RoundSummary | None, task: str, several: bool) -> dict[str, float]:
    return {} if summary is None else all_metrics(summary, task, several)


def _per_silo(summary: RoundSummary | None, task: str, several: bool) -> tuple[tuple[str, dict[str, float]], ...]:
    results = () if summary is None else summary.silo_results
    own = ((r.silo, task_metrics(r.metrics, task, several)) for r in results)
    return tuple((silo, metrics) for silo, metrics in own if metrics)


def _injected(summary: RoundSummary | None, task: str) -> dict[str, float]:
    prefix = f"{task}."
    metrics = {} if summary is None else summary.metrics
    return {key.removeprefix(prefix): value for key, value in metrics.items() if key.startswith(prefix)}


def _spread(metrics: dict[str, float], key: str) -> Spread:
    n = metrics.get(key + N)
    return None if n is None else round(n), metrics.get(key + LO), metrics.get(key + HI)


def format_report(job: JobStatus) -> str:
    rows = task_report(job)
    lines = [
        f"job {job.id} ({job.spec.name}): {job.state.value}, task {job.spec.task}, {job.spec.rounds} rounds",
        f"{'task':<28} {'modality':<9} {'role':<10} {'metric':<9} {'federated r0 -> last':<22} "
        f"{'held-out, 95% interval':<27} {'injected r0 -> last':<22} held-out, 95% interval",
    ]
    for row in rows:
        columns = f"{row.task:<28} {row.modality:<9} {row.role:<10} {row.metric:<9}"
        lines.append(
            f"{columns} {_pair(row.federated):<22} {_spread_text(row.federated_spread):<27} "
            f"{_pair(row.injected):<22} {_spread_text(row.injected_spread)}".rstrip()
        )
    injected = next((row.injected_rounds for row in rows if row.injected_rounds), None)
    if injected is not None:
        lines.append(
            f"(injected: checkpoints {injected[0]} and {injected[1]}; '-' where a stage does not score a task)"
        )
    for row in rows:
        lines.extend(_binary_lines(row))
        if row.reliability:
            lines.extend(_reliability_lines(row))
    return "\n".join(lines)


def _figure(metrics: dict[str, float], key: str) -> str:
    if key not in metrics:
        return "-"
    n, lo, hi = _spread(metrics, key)
    return f"{metrics[key]:.3f} n={n} {interval(lo, hi)}".removesuffix(" -")


def _binary_lines(row: TaskRow) -> list[str]:
    """The final model's sensitivity, specificity and ECE pooled, and each silo's AUC (which does not pool)."""
    if not row.final:
        return []
    lines = [
        f"final model on {row.task}, pooled held-out samples, decision threshold P(positive) > {THRESHOLD}:",
        f"  sensitivity {_figure(row.final, 'eval_sensitivity')}; specificity {_figure(row.final, 'eval_specificity')}"
        f"; ECE {_figure(row.final, 'eval_ece')}",
    ]
    aucs = [f"{silo} {_figure(metrics, 'eval_auc')}" for silo, metrics in row.final_silos if "eval_auc" in metrics]
    if aucs:
        lines.append(f"  AUC per silo (bootstrap 95% intervals): {'; '.join(aucs)}")
    return lines


def _spread_text(spread: Spread) -> str:
    n, lo, hi = spread
    return "-" if n is None else f"n={n} {interval(lo, hi)}".removesuffix(" -")


def _reliability_lines(row: TaskRow) -> list[str]:
    """The final model's reliability table of a binary task, pooled across the silos' held-out samples."""
    lines = [
        f"reliability of the final model on {row.task} (pooled held-out samples, bins of P(positive)):",
        f"  {'bin':<10} {'samples':>7} {'mean predicted':>14} {'observed rate':>13}",
    ]
    for k, n, positives, predicted in row.reliability:
        edges = f"{k / CALIBRATION_BINS:.1f}-{(k + 1) / CALIBRATION_BINS:.1f}"
        lines.append(f"  {edges:<10} {n:>7} {predicted:>14.3f} {positives / n:>13.3f}")
    return lines


def _pair(values: tuple[float | None, float | None]) -> str:
    first, last = values
    if first is None and last is None:
        return "-"
    return f"{_number(first)} -> {_number(last)}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
