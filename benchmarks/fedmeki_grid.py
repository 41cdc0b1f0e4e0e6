"""FedMEKI's approach grid through the real coordinator and silo agents (in process, on loopback).

    python -m benchmarks.fedmeki_grid --quick --out docs/fedmeki-grid
    (or: fedmeki bench fedmeki --quick ...)

Each cell of the grid is one FedMEKI job: an approach (an algorithm, or FedAvg with personal layers: fedper,
fedbn) x a data split (IID or Dirichlet label skew), 3 silos training the 4 tasks' encoders and an injector
injecting them into the language model after every round. Its rows: the federated model (scored by the silos,
with their personal layers where the approach has them), the injected model (scored by the injector), and for
Ditto and Per-FedAvg the silos' personalised models; per task with the task's metric. Each split also gets the
local-only and centralised baselines (benchmarks/baselines.py). Writes a Markdown table, a CSV and a PNG of the
learning curves. With `--pretrained-vit FOLDER` (a ViT the silos hold), each split also federates the x-ray tasks
on that ViT with LoRA, with each of `--vit-algorithms` (benchmarks/grid_vit.py); `--algorithms ''` runs these alone.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.baselines import BASELINES, baseline_scores
from benchmarks.grid_vit import BASE, XRAY_TASKS, vit_image_size, vit_row, vit_spec
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.algorithms import ALGORITHMS
from fedmeki_core.client import FedmekiClient
from fedmeki_core.encodings import ENCODINGS
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.records import JobState, JobStatus, RoundKind, RoundState
from fedmeki_core.report import task_report
from fedmeki_core.tasks import SUITES, get_task
from fedmeki_core.tasks.federation import Federation, write_synthetic_federation
from silo_agent.agent import SiloAgent
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer, resolve_device
from silo_agent.transport import GrpcTransport

TASKS = SUITES["fedmeki"].tasks


# FedBN keeps every normalisation layer at the silo (the ECG encoder's BatchNorms are blocks 1 and 4); FedPer keeps
# the task heads. Both run FedAvg on the rest.
PERSONAL = {
    "fedper": ("fedavg", ["heads.*"]),
    "fedbn": ("fedavg", ["*norm*", "encoders.ecg.blocks.1.*", "encoders.ecg.blocks.4.*"]),
}
APPROACHES = (*ALGORITHMS, *PERSONAL)


@dataclass(frozen=True)
class Cell:
    algorithm: str  # an approach: an algorithm, or one of PERSONAL
    partition: str
    job: JobStatus | None  # None for a baseline and the single-task setting
    seconds: float
    baseline: dict[str, float] | None = None  # a baseline's score per training task
    single: dict[str, JobStatus] | None = None  # the single-task setting (or the ViT path): one job per task
    vit: bool = False  # the pretrained-ViT path: `single` holds the x-ray tasks' jobs on the ViT

    @property
    def label(self) -> str:
        setting = "/pretrained-vit" if self.vit else "/single-task" if self.single is not None else ""
        return f"{self.algorithm}/{self.partition}{setting}"


def _agent(
    coordinator: Coordinator, work_dir: Path, name: str, role: str, data: dict[str, Path], vit: Path | None
) -> SiloAgent:
    address = f"127.0.0.1:{coordinator.port}"
    _, token = coordinator.registry.add(name, role)
    enrollment = coordinator.registry.enroll(token)
    settings = SiloSettings(
        coordinator=address,
        work_dir=work_dir,
        device="auto",
        data=data,
        poll_wait_seconds=0.2,
        holdout_fraction=0.5 if role == "injector" else 0.2,
        models={} if vit is None else {BASE: vit},
    )
    transport = GrpcTransport(address, enrollment.credential)
    return SiloAgent(settings, transport, AgentState(work_dir), LocalTrainer.from_settings(settings))


def _federation(partition: str, args: argparse.Namespace, root: Path) -> Federation:
    return write_synthetic_federation(
        "fedmeki",
        args.silos,
        args.samples,
        root,
        image_size=args.image_size,
        partition=partition,
        alpha=args.alpha,
        public_fraction=0.2,
        seed=args.seed,
    )


def _spec(approach: str, partition: str, args: argparse.Namespace, task: str = "fedmeki") -> JobSpec:
    """The cell's job: the suite with injection, or (the single-task setting) one training task without."""
    algorithm, personal = PERSONAL.get(approach, (approach, []))
    injection = {"language_model": args.language_model, "epochs": 4, "batch_size": 16}
    return parse_job_spec(
        {
            "name": f"grid-{approach}-{partition}-{task}",
            "task": task,
            "rounds": args.rounds,
            "min_silos": args.silos,
            "round_deadline_seconds": args.round_deadline,  # a stuck cell fails instead of holding the grid up
            "seed": args.seed,
            "delta_encoding": args.delta_encoding,
            "model": {"architecture": args.architecture},
            "algorithm": {
                "name": algorithm,
                "local_epochs": 2,
                "batch_size": 32,
                "learning_rate": 2e-3,
                "personal": personal,
            },
            "injection": injection,
        }
    )


def run_baseline(kind: str, partition: str, args: argparse.Namespace, root: Path) -> Cell:
    """A baseline on the same data as the federated cells, scored the same way (benchmarks/baselines.py)."""
    federation = _federation(partition, args, root / "data")
    trainers = [LocalTrainer(resolve_device("auto"), files, 0.2) for files in federation.silos]
    started = time.monotonic()
    scores = baseline_scores(kind, _spec("fedavg", partition, args), trainers, root / "baseline")
    return Cell(kind, partition, None, time.monotonic() - started, scores)


def run_cell(
    algorithm: str, partition: str, args: argparse.Namespace, root: Path, single: bool = False, vit: bool = False
) -> Cell:
    """One approach on one split: the suite job (multi-task), or one job per training task at once (single), or
    one per x-ray task on the pretrained ViT (vit)."""
    federation = _federation(partition, args, root / "data")
    coordinator = Coordinator(CoordinatorSettings(address="127.0.0.1:0", data_dir=root / "coordinator"))
    coordinator.start()
    started = time.monotonic()
    try:
        agents = [
            _agent(coordinator, root / f"silo-{i}", f"silo-{i}", "trainer", files, args.pretrained_vit)
            for i, files in enumerate(federation.silos)
        ]
        agents.append(_agent(coordinator, root / "injector", "injector", "injector", federation.injector, None))
        tasks = XRAY_TASKS if vit else SUITES["fedmeki"].train if single else ("fedmeki",)
        with FedmekiClient(f"127.0.0.1:{coordinator.port}") as client:
            specs = {
                t: vit_spec(algorithm, partition, args, t) if vit else _spec(algorithm, partition, args, t)
                for t in tasks
            }
            jobs = {
                t: client.submit_job(spec, base=args.pretrained_vit if vit else None).id for t, spec in specs.items()
            }
            while True:
                statuses = {task: client.get_job(job_id) for task, job_id in jobs.items()}
                if all(status.state.finished for status in statuses.values()):
                    break
                for agent in agents:
                    agent.run_once()
        seconds = time.monotonic() - started
        if single or vit:
            return Cell(algorithm, partition, None, seconds, single=statuses, vit=vit)
        return Cell(algorithm, partition, statuses["fedmeki"], seconds)
    finally:
        coordinator.stop(grace=0)


def _single_rows(cell: Cell) -> list[dict[str, str]]:
    """The single-task setting's rows: each training task's own job, its federated score and its injected model's;
    a zero-shot column is the mean over the single-task jobs whose injected model scored it (same modality)."""
    assert cell.single is not None
    federated = {
        "approach": f"{cell.algorithm} / {cell.partition} / single-task / federated",
        **dict.fromkeys(TASKS, "-"),
    }
    injected = {
        "approach": f"{cell.algorithm} / {cell.partition} / single-task / injected",
        **dict.fromkeys(TASKS, "-"),
    }
    zero_shot: dict[str, list[float]] = {}
    for task, job in cell.single.items():
        if job.state != JobState.COMPLETED:
            federated[task] = injected[task] = "failed"
            continue
        final = next((r for r in reversed(job.rounds) if r.kind == RoundKind.EVALUATE), None)
        key = f"eval_{get_task(task).metric}"
        federated[task] = f"{final.metrics[key]:.3f}" if final is not None and key in final.metrics else "-"
        last = job.injections[-1].metrics if job.injections else {}
        for name in TASKS:
            value = last.get(f"{name}.{get_task(name).metric}")
            if value is None:
                continue
            if name == task:
                injected[name] = f"{value:.3f}"
            elif name not in cell.single:
                zero_shot.setdefault(name, []).append(value)
    injected.update({name: f"{sum(values) / len(values):.3f}" for name, values in zero_shot.items()})
    return [federated, injected]


def _personalised(job: JobStatus) -> dict[str, float]:
    """The silos' personalised models' scores (Ditto, Per-FedAvg) in the last training round, by task."""
    last = next(
        (r for r in reversed(job.rounds) if r.kind == RoundKind.TRAIN and r.state == RoundState.COMMITTED), None
    )
    if last is None:
        return {}
    keys = {task: f"{task}.personal_eval_{get_task(task).metric}" for task in TASKS}
    return {task: last.metrics[key] for task, key in keys.items() if key in last.metrics}


def _rows(cells: list[Cell]) -> list[dict[str, str]]:
    rows = []
    for cell in cells:
        name = f"{cell.algorithm} / {cell.partition}"
        if cell.vit and cell.single is not None:
            rows.append(vit_row(name, cell.single, TASKS))
            continue
        if cell.single is not None:
            rows.extend(_single_rows(cell))
            continue
        if cell.baseline is not None:
            rows.append({"approach": f"{name} (baseline)", **dict.fromkeys(TASKS, "-")})
            rows[-1].update({task: f"{value:.3f}" for task, value in cell.baseline.items()})
            continue
        assert cell.job is not None
        if cell.job.state != JobState.COMPLETED:  # a diverged or failed approach is a result too
            reason = cell.job.reason.replace("|", "/")
            rows.append({"approach": name, **dict.fromkeys(TASKS, "failed")})
            rows[-1][TASKS[0]] = f"failed: {reason}"
            continue
        report = {row.task: row for row in task_report(cell.job)}
        for model, column in (("federated", "federated"), ("injected", "injected")):
            row = {"approach": f"{name} / {model}"}
            for task in TASKS:
                value = getattr(report[task], column)[1]
                row[task] = "-" if value is None else f"{value:.3f}"
            rows.append(row)
        if personal := _personalised(cell.job):
            rows.append({"approach": f"{name} / personalised", **dict.fromkeys(TASKS, "-")})
            rows[-1].update({task: f"{value:.3f}" for task, value in personal.items()})
    return rows


def _curves(cell: Cell) -> tuple[list[float], list[float]]:
    """Mean training-task accuracy per checkpoint: the silos' (federated) and the injector's (injected)."""
    assert cell.job is not None
    train = SUITES["fedmeki"].train
    federated = [
        r.metrics["eval_accuracy"]
        for r in cell.job.rounds
        if r.state == RoundState.COMMITTED and r.kind in (RoundKind.TRAIN, RoundKind.EVALUATE)
    ]
    injected = [sum(i.metrics.get(f"{t}.accuracy", 0.0) for t in train) / len(train) for i in cell.job.injections]
    return federated, injected


def write_outputs(cells: list[Cell], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows = _rows(cells)
    with (out / "fedmeki-grid.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["approach", *TASKS])
        writer.writeheader()
        writer.writerows(rows)
    header = "| approach | " + " | ".join(f"{t} ({get_task(t).metric})" for t in TASKS) + " |"
    lines = [f"`{command}`", "", header, "|" + "---|" * (len(TASKS) + 1)]
    lines += ["| " + " | ".join([row["approach"], *(row[t] for t in TASKS)]) + " |" for row in rows]
    lines += ["", "Seconds per cell: " + ", ".join(f"{c.label} {c.seconds:.0f}" for c in cells)]
    (out / "fedmeki-grid.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = plt.get_cmap("tab20")
    for index, cell in enumerate(c for c in cells if c.job is not None and c.job.state == JobState.COMPLETED):
        federated, injected = _curves(cell)
        style = {"color": colours(index % 20), "marker": "o" if cell.partition == "iid" else "x"}
        label = f"{cell.algorithm}/{cell.partition}"
        left.plot(range(len(federated)), federated, label=label, **style)
        right.plot(range(len(injected)), injected, linestyle="--", **style)
    left.set_title("federated model (silos' held-out data)")
    right.set_title("injected model (injector's test data)")
    for axes in (left, right):
        axes.set_xlabel("checkpoint")
    left.set_ylabel("mean accuracy, 4 training tasks")
    figure.legend(loc="center right", fontsize=7)
    figure.tight_layout(rect=(0, 0, 0.83, 1))
    figure.savefig(out / "fedmeki-grid.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.fedmeki_grid", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the tiny configuration on the CPU (the default sizes)")
    parser.add_argument(
        "--algorithms",
        default=",".join(APPROACHES),
        help=f"comma-separated approaches (default: every one): {', '.join(APPROACHES)}",
    )
    parser.add_argument(
        "--single-task",
        default="fedavg,fedprox",
        help="approaches that also run FedMEKI's single-task setting (one job per training task); '' for none",
    )
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="comma-separated: local (each silo alone), centralised (all data pooled); '' for none",
    )
    parser.add_argument("--partitions", default="iid,dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--samples", type=int, default=600, help="samples per training task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--architecture", default="fedmeki-encoders-tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--language-model", default="tiny-llama", help="tiny-llama or a local Hugging Face folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delta-encoding", default="float32", choices=ENCODINGS, help="how the silos send deltas")
    parser.add_argument("--round-deadline", type=float, default=120, help="seconds; a slower round fails its cell")
    parser.add_argument("--out", type=Path, default=Path("docs/fedmeki-grid"))
    parser.add_argument(
        "--pretrained-vit",
        type=Path,
        help="a save_pretrained ViT folder (images of --image-size): the x-ray tasks also federated on it with LoRA",
    )
    parser.add_argument("--vit-algorithms", default="fedavg", help="the algorithms of the pretrained-ViT cells")
    args = parser.parse_args(argv)
    if args.pretrained_vit is not None and vit_image_size(args.pretrained_vit) != args.image_size:
        parser.error(
            f"--pretrained-vit takes {vit_image_size(args.pretrained_vit)}-pixel images: give that --image-size"
        )
    if not args.quick and args.architecture == "fedmeki-encoders-tiny":
        parser.error("without --quick, name the full configuration: --architecture fedmeki-encoders --image-size 224")
    unknown = sorted(set(filter(None, args.algorithms.split(","))) - set(APPROACHES))
    unknown += sorted(set(filter(None, args.vit_algorithms.split(","))) - set(ALGORITHMS))
    unknown += sorted(set(filter(None, args.baselines.split(","))) - set(BASELINES))
    if unknown:
        parser.error(f"unknown approach {unknown[0]!r}; known: {', '.join((*APPROACHES, *BASELINES))}")
    cells = []
    for partition in args.partitions.split(","):
        for kind in filter(None, args.baselines.split(",")):
            with tempfile.TemporaryDirectory(prefix="fedmeki-grid-") as tmp:
                cells.append(run_baseline(kind, partition, args, Path(tmp)))
            print(f"{kind} / {partition}: baseline in {cells[-1].seconds:.0f}s", flush=True)
        for algorithm in filter(None, args.algorithms.split(",")):
            with tempfile.TemporaryDirectory(prefix="fedmeki-grid-") as tmp:
                cell = run_cell(algorithm, partition, args, Path(tmp))
            cells.append(cell)
            assert cell.job is not None
            print(f"{algorithm} / {partition}: {cell.job.state.value} in {cell.seconds:.0f}s", flush=True)
            if algorithm in args.single_task.split(","):
                with tempfile.TemporaryDirectory(prefix="fedmeki-grid-") as tmp:
                    cells.append(run_cell(algorithm, partition, args, Path(tmp), single=True))
                print(f"{algorithm} / {partition} / single-task: {cells[-1].seconds:.0f}s", flush=True)
        for algorithm in filter(None, args.vit_algorithms.split(",") if args.pretrained_vit is not None else []):
            with tempfile.TemporaryDirectory(prefix="fedmeki-grid-") as tmp:
                cells.append(run_cell(algorithm, partition, args, Path(tmp), vit=True))
            print(f"{algorithm} / {partition} / pretrained-vit: {cells[-1].seconds:.0f}s", flush=True)
    command = "python -m benchmarks.fedmeki_grid " + " ".join(argv if argv is not None else sys.argv[1:])
    write_outputs(cells, args.out, command)
    print((args.out / "fedmeki-grid.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
