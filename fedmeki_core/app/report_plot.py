"""Learning curves of a job as a PNG: each task's headline metric by checkpoint, the aggregate and each silo.

matplotlib is imported only here, when a plot is asked for: it is the `plot` extra (`pip install 'fedmeki[plot]'`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fedmeki_core.errors import PreconditionError
from fedmeki_core.records import RoundKind
from fedmeki_core.round_report import ALL, MetricRow


def plot_curves(rows: list[MetricRow], path: Path, title: str) -> None:
    """One panel per task: "all" as a bold line, each silo thin and light, the injected model dashed."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PreconditionError("--plot needs matplotlib: pip install 'fedmeki[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tasks = list(dict.fromkeys(row.task for row in rows))
    columns = min(len(tasks), 4) or 1
    lines_of_panels = -(-len(tasks) // columns) or 1
    figure, axes = plt.subplots(lines_of_panels, columns, figsize=(4.2 * columns, 3.2 * lines_of_panels), squeeze=False)
    for axis, task in zip(axes.flat, tasks, strict=False):
        curves: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for row in rows:
            if row.task == task and row.value is not None:
                source = "injected" if row.kind == RoundKind.INJECT else "federated"
                curves[(source, row.silo)].append((row.checkpoint, row.value))
        for (source, silo), points in sorted(curves.items(), key=lambda item: item[0][1] == ALL):
            xs, ys = zip(*sorted(points), strict=True)
            if source == "injected":
                axis.plot(xs, ys, "s--", color="tab:orange", label="injected model")
            elif silo == ALL:
                axis.plot(xs, ys, "o-", color="tab:blue", linewidth=2.2, label="federated, all silos")
            else:
                axis.plot(xs, ys, "-", color="tab:blue", alpha=0.3, linewidth=1, label="federated, one silo")
        metric = next(row.metric for row in rows if row.task == task)
        axis.set(title=task, xlabel="checkpoint", ylabel=metric)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axis.legend(unique.values(), unique.keys(), fontsize="small")
    for axis in list(axes.flat)[len(tasks) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
