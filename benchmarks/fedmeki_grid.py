"""FedMEKI's approach grid through the real coordinator and silo agents (in process, on loopback).

    python -m benchmarks.fedmeki_grid --quick --out docs/fedmeki-grid
    (or: fedmeki bench fedmeki --quick ...)

Each cell of the grid is one FedMEKI job: an algorithm x a data split (IID or Dirichlet label skew), 3 silos
training the 4 tasks' encoders and an injector injecting them into the language model after every round. Its
rows: the federated model (scored by the silos) and the injected model (scored by the injector), per task with
the task's metric. Writes a Markdown table, a CSV and a PNG of the learning curves.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from fedmeki_core.algorithms import ALGORITHMS
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, JobStatus, RoundKind, RoundState
from fedmeki_core.report import task_report
from fedmeki_core.tasks import SUITES, get_task
from fedmeki_core.tasks.federation import write_synthetic_federation
from silo_agent.agent import SiloAgent
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.trainer import LocalTrainer
from silo_agent.transport import GrpcTransport

TASKS = SUITES["fedmeki"].tasks


@dataclass(frozen=True)
class Cell:
    algorithm: str
    partition: str
    job: JobStatus
    seconds: float


def _agent(coordinator: Coordinator, work_dir: Path, name: str, role: str, data: dict[str, Path]) -> SiloAgent:
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
    )
    transport = GrpcTransport(address, enrollment.credential)
    return SiloAgent(settings, transport, AgentState(work_dir), LocalTrainer.from_settings(settings))


def run_cell(algorithm: str, partition: str, args: argparse.Namespace, root: Path) -> Cell:
    federation = write_synthetic_federation(
        "fedmeki",
        args.silos,
        args.samples,
        root / "data",
        image_size=args.image_size,
        partition=partition,
        alpha=args.alpha,
        public_fraction=0.2,
        seed=args.seed,
    )
    coordinator = Coordinator(CoordinatorSettings(address="127.0.0.1:0", data_dir=root / "coordinator"))
    coordinator.start()
    started = time.monotonic()
    try:
        agents = [
            _agent(coordinator, root / f"silo-{i}", f"silo-{i}", "trainer", files)
            for i, files in enumerate(federation.silos)
        ]
        agents.append(_agent(coordinator, root / "injector", "injector", "injector", federation.injector))
        spec = parse_job_spec(
            {
                "name": f"grid-{algorithm}-{partition}",
                "task": "fedmeki",
                "rounds": args.rounds,
                "min_silos": args.silos,
                "round_deadline_seconds": 120,  # a diverging cell fails instead of holding the grid up
                "seed": args.seed,
                "model": {"architecture": args.architecture},
                "algorithm": {"name": algorithm, "local_epochs": 2, "batch_size": 32, "learning_rate": 2e-3},
                "injection": {"language_model": args.language_model, "epochs": 4, "batch_size": 16},
            }
        )
        with FedmekiClient(f"127.0.0.1:{coordinator.port}") as client:
            job = client.submit_job(spec)
            while not (status := client.get_job(job.id)).state.finished:
                for agent in agents:
                    agent.run_once()
        return Cell(algorithm, partition, status, time.monotonic() - started)
    finally:
        coordinator.stop(grace=0)


def _rows(cells: list[Cell]) -> list[dict[str, str]]:
    rows = []
    for cell in cells:
        if cell.job.state != JobState.COMPLETED:  # a diverged or failed approach is a result too
            reason = cell.job.reason.replace("|", "/")
            rows.append({"approach": f"{cell.algorithm} / {cell.partition}", **dict.fromkeys(TASKS, "failed")})
            rows[-1][TASKS[0]] = f"failed: {reason}"
            continue
        report = {row.task: row for row in task_report(cell.job)}
        for model, column in (("federated", "federated"), ("injected", "injected")):
            row = {"approach": f"{cell.algorithm} / {cell.partition} / {model}"}
            for task in TASKS:
                value = getattr(report[task], column)[1]
                row[task] = "-" if value is None else f"{value:.3f}"
            rows.append(row)
    return rows


def _curves(cell: Cell) -> tuple[list[float], list[float]]:
    """Mean training-task accuracy per checkpoint: the silos' (federated) and the injector's (injected)."""
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
    lines += ["", "Seconds per cell: " + ", ".join(f"{c.algorithm}/{c.partition} {c.seconds:.0f}" for c in cells)]
    (out / "fedmeki-grid.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colours = plt.get_cmap("tab20")
    for index, cell in enumerate(c for c in cells if c.job.state == JobState.COMPLETED):
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
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated (default: every one)")
    parser.add_argument("--partitions", default="iid,dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--samples", type=int, default=600, help="samples per training task")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--architecture", default="fedmeki-encoders-tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--language-model", default="tiny-llama", help="tiny-llama or a local Hugging Face folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/fedmeki-grid"))
    args = parser.parse_args(argv)
    if not args.quick and args.architecture == "fedmeki-encoders-tiny":
        parser.error("without --quick, name the full configuration: --architecture fedmeki-encoders --image-size 224")
    cells = []
    for algorithm in args.algorithms.split(","):
        for partition in args.partitions.split(","):
            with tempfile.TemporaryDirectory(prefix="fedmeki-grid-") as tmp:
                cell = run_cell(algorithm, partition, args, Path(tmp))
            cells.append(cell)
            print(f"{algorithm} / {partition}: {cell.job.state.value} in {cell.seconds:.0f}s", flush=True)
    command = "python -m benchmarks.fedmeki_grid " + " ".join(argv if argv is not None else sys.argv[1:])
    write_outputs(cells, args.out, command)
    print((args.out / "fedmeki-grid.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
