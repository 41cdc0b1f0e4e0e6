"""`fedmeki demo`: a coordinator and silo agents as separate processes on loopback, one FedAvg job end to end.

Everything lives under the data directory: the coordinator's SQLite database and checkpoints, each silo's
synthetic data, state and work files, the processes' logs, and the final model.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import yaml

from fedmeki_core.cli import follow
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import FedmekiError, UnavailableError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobState, JobStatus, RoundKind
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic_vitals import generate

TASK = "synthetic-vitals"
_SAMPLES = (900, 600, 400, 700, 500, 800, 300, 1000)  # unequal silos, so sample weighting matters
_START_TIMEOUT = 120.0


class _Process:
    """A child process with its output in a log file; stopped with SIGTERM, killed if it lingers."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )

    def read_line_matching(self, pattern: str, timeout: float) -> re.Match[str]:
        assert self.popen.stdout is not None
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            line = self.popen.stdout.readline().decode()
            if not line:
                raise FedmekiError(f"{self.name} exited early; see {self.log_path}")
            self._log.write(line.encode())
            if match := re.search(pattern, line):
                return match
        raise FedmekiError(f"{self.name} did not start in {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


def _run(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FedmekiError(f"{' '.join(args[2:4])} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def add_silo(name: str, *coordinator_options: str) -> str:
    """Register a silo with `fedmeki-coordinator silo add` (its own process) and return the enrollment token."""
    output = _run([sys.executable, "-m", "coordinator", "silo", "add", name, *coordinator_options])
    token = re.search(r"enrollment token \(shown once\): (\S+)", output)
    if token is None:
        raise FedmekiError(f"silo add printed no enrollment token: {output.strip()}")
    return token.group(1)


@contextlib.contextmanager
def _processes() -> Iterator[list[_Process]]:
    started: list[_Process] = []
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


def _wait_ready(address: str) -> None:
    give_up = time.monotonic() + _START_TIMEOUT
    with FedmekiClient(address) as client:
        while True:
            try:
                client.list_jobs()
                return
            except UnavailableError:
                if time.monotonic() > give_up:
                    raise
                time.sleep(0.2)


def _accuracy_table(job: JobStatus) -> list[tuple[str, float, float]]:
    """(model, eval accuracy, eval loss): round r's silos evaluated the model of round r-1 before training."""
    rows = []
    for summary in job.rounds:
        if "eval_accuracy" not in summary.metrics:
            continue
        model = "final" if summary.kind == RoundKind.EVALUATE else f"after round {summary.number - 1}"
        if summary.number == 1:
            model = "initial (round 0)"
        rows.append((model, summary.metrics["eval_accuracy"], summary.metrics.get("eval_loss", float("nan"))))
    return rows


def run_demo(data_dir: Path, rounds: int = 3, silos: int = 3, delta_encoding: str = "float32") -> int:
    if not 1 <= silos <= len(_SAMPLES):
        raise FedmekiError(f"--silos must be between 1 and {len(_SAMPLES)}")
    started_at = time.monotonic()
    data_dir = data_dir.resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "logs").mkdir(parents=True)
    coordinator_dir = data_dir / "coordinator"
    python = sys.executable
    print(
        f"fedmeki demo: {silos} silos, {rounds} FedAvg rounds, deltas as {delta_encoding}, files under {data_dir}",
        flush=True,
    )

    with _processes() as processes:
        coordinator = _Process(
            "coordinator",
            [
                python,
                "-m",
                "coordinator",
                "serve",
                "--address",
                "127.0.0.1:0",
                "--data-dir",
                str(coordinator_dir),
            ],
            data_dir / "logs" / "coordinator.log",
        )
        processes.append(coordinator)
        port = coordinator.read_line_matching(r"listening on [^:]+:(\d+)", _START_TIMEOUT).group(1)
        address = f"127.0.0.1:{port}"
        print(f"coordinator listening on {address} (log: {coordinator.log_path})", flush=True)

        for index in range(silos):
            name = f"hospital-{chr(ord('a') + index)}"
            work_dir = data_dir / "silos" / name
            data_file = work_dir / "data" / f"{TASK}.safetensors"
            dataset = generate(_SAMPLES[index], silo_index=index, num_silos=silos, seed=7)
            save_dataset(dataset, data_file)
            token = add_silo(name, "--data-dir", str(coordinator_dir))
            _run(
                [
                    python,
                    "-m",
                    "silo_agent",
                    "enroll",
                    "--coordinator",
                    address,
                    "--token",
                    token,
                    "--work-dir",
                    str(work_dir),
                ]
            )
            config = work_dir / "silo.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "coordinator": address,
                        "work_dir": str(work_dir),
                        "device": "auto",
                        "data": {TASK: str(data_file)},
                        "poll_wait_seconds": 5,
                    }
                )
            )
            processes.append(
                _Process(
                    name,
                    [python, "-m", "silo_agent", "run", "--config", str(config)],
                    data_dir / "logs" / f"{name}.log",
                )
            )
            positives = float(dataset.labels.mean())
            print(
                f"silo {name}: {len(dataset)} samples, {positives:.0%} positive (log: logs/{name}.log)",
                flush=True,
            )

        _wait_ready(address)
        spec = parse_job_spec(
            {
                "name": "demo-synthetic-vitals",
                "task": TASK,
                "rounds": rounds,
                "min_silos": silos,
                "round_deadline_seconds": 300,
                "delta_encoding": delta_encoding,
                "seed": 1,
                "algorithm": {"name": "fedavg", "local_epochs": 2, "batch_size": 32, "learning_rate": 0.003},
            }
        )
        with FedmekiClient(address) as client:
            job = client.submit_job(spec)
            print(f"submitted job {job.id}: {spec.rounds} rounds of FedAvg on {TASK}", flush=True)
            final = follow(client.watch_job(job.id))
            if final is None or final.state != JobState.COMPLETED:
                print(f"the job did not complete: {final.reason if final else 'no status'}", file=sys.stderr)
                return 1
            model_path = data_dir / "final-model.safetensors"
            info = client.download_checkpoint(job.id, model_path)

    table = _accuracy_table(final)
    print("\nglobal model, evaluated by the silos on their held-out data (sample-weighted):")
    print(f"  {'model':<20} {'accuracy':>9} {'loss':>8}")
    for model, accuracy, loss in table:
        print(f"  {model:<20} {accuracy:>9.3f} {loss:>8.4f}")
    if len(table) >= 2:
        gain = table[-1][1] - table[0][1]
        verdict = "better than" if gain > 0 else "NOT better than"
        print(f"the final global model is {verdict} round 0: accuracy {table[0][1]:.3f} -> {table[-1][1]:.3f}")
    print(f"\nfinal global model: {model_path} (round {info.round}, sha256 {info.sha256[:16]}…)")
    print(f"database:           {coordinator_dir / 'coordinator.db'}")
    print(f"checkpoints:        {coordinator_dir / 'checkpoints' / job.id}")
    print(f"finished in {time.monotonic() - started_at:.0f}s")
    return 0
