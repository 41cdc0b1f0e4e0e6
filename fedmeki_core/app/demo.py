"""`fedmeki demo`: a coordinator and silo agents as separate processes on loopback, one job end to end.

`--workload vitals` (the default) runs FedAvg on the synthetic vitals task; `--workload fedmeki` runs the FedMEKI
suite on its tiny configuration with an injector and prints the per-task table.

Everything lives under the data directory: the coordinator's SQLite database and checkpoints, each silo's
synthetic data, state and work files, the processes' logs, and the final model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
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

from fedmeki_core.app.job_view import follow
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import FedmekiError, UnavailableError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.privacy.he import PUBLIC_FILE, SECRET_FILE, read_secret_context, write_key_files
from fedmeki_core.records import CheckpointInfo, JobState, JobStatus, RoundKind
from fedmeki_core.report import format_report
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.federation import write_synthetic_federation
from fedmeki_core.tasks.synthetic_vitals import generate

TASK = "synthetic-vitals"
_SAMPLES = (900, 600, 400, 700, 500, 800, 300, 1000)  # unequal silos, so sample weighting matters
_START_TIMEOUT = 120.0


class _Process:
    """A child process with its output in a log file; stopped with SIGTERM, killed if it lingers."""

    def __init__(self, name: str, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self._log, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
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

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


def _run(args: list[str]) -> str:
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FedmekiError(f"{' '.join(args[2:4])} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def add_silo(name: str, *coordinator_options: str) -> str:
    """Register a silo with `fedmeki-coordinator silo add` (its own process) and return the enrollment token."""
    output = _run([sys.executable, "-m", "coordinator", "silo", "add", name, *coordinator_options])
    token = re.search(r"enrollment token \(shown once[^)]*\): (\S+)", output)
    if token is None:
        raise FedmekiError(f"silo add printed no enrollment token: {output.strip()}")
    return token.group(1)


@contextlib.contextmanager
def _processes() -> Iterator[list[_Process]]:
    """The demo's processes, the coordinator first; at the end the agents stop together (each finishes its poll),
    then the coordinator, so that no agent waits out a retry against a coordinator that is gone."""
    started: list[_Process] = []
    try:
        yield started
    finally:
        for group in (started[1:], started[:1]):
            for process in group:
                process.terminate()
            for process in group:
                process.wait()


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


def _fresh(data_dir: Path) -> Path:
    data_dir = data_dir.resolve()
    if data_dir.exists():
        shutil.rmtree(data_dir)
    (data_dir / "logs").mkdir(parents=True)
    return data_dir


def _launch_coordinator(processes: list[_Process], data_dir: Path) -> _Process:
    """Start the coordinator's process; `_coordinator_address` waits for it (other work can go on meanwhile)."""
    coordinator_dir = data_dir / "coordinator"
    command = ["-m", "coordinator", "serve", "--address", "127.0.0.1:0", "--data-dir", str(coordinator_dir)]
    coordinator = _Process("coordinator", [sys.executable, *command], data_dir / "logs" / "coordinator.log")
    processes.append(coordinator)
    return coordinator


def _coordinator_address(coordinator: _Process) -> str:
    port = coordinator.read_line_matching(r"listening on [^:]+:(\d+)", _START_TIMEOUT).group(1)
    address = f"127.0.0.1:{port}"
    print(f"coordinator listening on {address} (log: {coordinator.log_path})", flush=True)
    return address


@dataclasses.dataclass(frozen=True)
class _Agent:
    """One silo agent to start: its name, data, role and held-out share, and its CKKS secret key if any."""

    name: str
    data: dict[str, Path]
    role: str = "trainer"
    holdout_fraction: float = 0.2
    ckks_key: Path | None = None


def _start_agents(processes: list[_Process], data_dir: Path, address: str, agents: list[_Agent]) -> None:
    """Register, enroll and start every agent, all at once (each step is its own process: one after another they
    took most of the demo's time), in the order given."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(agents)) as pool:
        commands = list(pool.map(lambda agent: _prepare_agent(data_dir, address, agent, len(agents)), agents))
    for agent, (command, env) in zip(agents, commands, strict=True):
        processes.append(_Process(agent.name, command, data_dir / "logs" / f"{agent.name}.log", env))


def _prepare_agent(data_dir: Path, address: str, agent: _Agent, agents: int) -> tuple[list[str], dict[str, str]]:
    """Register (with its role) and enroll one silo agent, write its silo.yaml; returns its command and variables.

    The demo's agents share one machine: each gets its share of the cores as torch threads (measured: three
    agents with two threads each on two cores spin against each other, 85 s for the vitals demo against 37 s).
    """
    work_dir = data_dir / "silos" / agent.name
    token = add_silo(agent.name, "--role", agent.role, "--data-dir", str(data_dir / "coordinator"))
    python = sys.executable
    _run(
        [python, "-m", "silo_agent", "enroll", "--coordinator", address, "--token", token, "--work-dir", str(work_dir)]
    )
    config = work_dir / "silo.yaml"
    settings = {
        "coordinator": address,
        "work_dir": str(work_dir),
        "device": "auto",
        "data": {task: str(path) for task, path in agent.data.items()},
        "poll_wait_seconds": 5,
        "holdout_fraction": agent.holdout_fraction,
    }
    if agent.ckks_key is not None:
        settings["ckks_secret_context"] = str(agent.ckks_key)
    config.write_text(yaml.safe_dump(settings))
    command = [python, "-m", "silo_agent", "run", "--config", str(config)]
    return command, {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // agents))}


def _follow_to_the_end(
    address: str, spec: JobSpec, data_dir: Path, ckks_keys: Path | None = None
) -> tuple[JobStatus, CheckpointInfo] | None:
    """Submit, print the job's events until it ends, download its final model; None when it did not complete.

    With CKKS keys the job goes with the public context, and the final model is rebuilt with the secret key (as a
    hospital would: the coordinator only has encrypted aggregates).
    """
    _wait_ready(address)
    with FedmekiClient(address) as client:
        job = client.submit_job(spec, ckks_public_context=None if ckks_keys is None else ckks_keys / PUBLIC_FILE)
        print(f"submitted job {job.id}: {spec.rounds} rounds on {spec.task}", flush=True)
        final = follow(client.watch_job(job.id))
        if final is None or final.state != JobState.COMPLETED:
            print(f"the job did not complete: {final.reason if final else 'no status'}", file=sys.stderr)
            return None
        output = data_dir / "final-model.safetensors"
        if ckks_keys is None:
            return final, client.download_checkpoint(job.id, output)
        last = client.download_decrypted(job.id, read_secret_context(ckks_keys / SECRET_FILE), output)
        return final, CheckpointInfo(job.id, last, output.stat().st_size, sha256_file(output))


def _print_files(data_dir: Path, job: JobStatus, info: CheckpointInfo, started_at: float) -> None:
    print(
        f"\nfinal global model: {data_dir / 'final-model.safetensors'} (round {info.round}, sha256 {info.sha256[:16]}…)"
    )
    print(f"database:           {data_dir / 'coordinator' / 'coordinator.db'}")
    print(f"checkpoints:        {data_dir / 'coordinator' / 'checkpoints' / job.id}")
    print(f"finished in {time.monotonic() - started_at:.0f}s")


def run_demo(
    data_dir: Path, rounds: int = 3, silos: int = 3, delta_encoding: str = "float32", secure_aggregation: str = "none"
) -> int:
    if not 1 <= silos <= len(_SAMPLES):
        raise FedmekiError(f"--silos must be between 1 and {len(_SAMPLES)}")
    if secure_aggregation != "none" and silos < 3:
        raise FedmekiError(
            f"--secure-aggregation {secure_aggregation} needs at least 3 silos (with 2, each learns the other's update)"
        )
    started_at = time.monotonic()
    data_dir = _fresh(data_dir)
    print(
        f"fedmeki demo: {silos} silos, {rounds} FedAvg rounds, deltas as {delta_encoding}, files under {data_dir}",
        flush=True,
    )
    keys = None
    if secure_aggregation != "none":
        keys = data_dir / "keys"
        fingerprint = write_key_files(keys).fingerprint
        how = (
            "the coordinator holds only keys/public.ckks, adds ciphertexts"
            if secure_aggregation == "ckks"
            else "cyclic: a rotating initiator masks its ciphertexts, the running sum passes silo to silo through the "
            "coordinator, which holds only keys/public.ckks and relays ciphertexts,"
        )
        print(
            f"secure aggregation: CKKS (TenSEAL, N 8192, key set {fingerprint[:16]}…): each silo encrypts its "
            f"weighted delta with keys/secret.ckks; {how} and never sees a plaintext delta or the aggregate; the "
            "silos decrypt it",
            flush=True,
        )
    with _processes() as processes:
        coordinator = _launch_coordinator(processes, data_dir)
        agents, lines = [], []
        for index in range(silos):
            name = f"hospital-{chr(ord('a') + index)}"
            data_file = data_dir / "silos" / name / "data" / f"{TASK}.safetensors"
            dataset = generate(_SAMPLES[index], silo_index=index, num_silos=silos, seed=7)
            save_dataset(dataset, data_file)
            agents.append(_Agent(name, {TASK: data_file}, ckks_key=None if keys is None else keys / SECRET_FILE))
            positives = float(dataset.labels.mean())
            lines.append(f"silo {name}: {len(dataset)} samples, {positives:.0%} positive (log: logs/{name}.log)")
        address = _coordinator_address(coordinator)
        _start_agents(processes, data_dir, address, agents)
        print("\n".join(lines), flush=True)
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
                "privacy": {"secure_aggregation": secure_aggregation},
            }
        )
        outcome = _follow_to_the_end(address, spec, data_dir, keys)
    if outcome is None:
        return 1
    final, info = outcome
    table = _accuracy_table(final)
    print("\nglobal model, evaluated by the silos on their held-out data (sample-weighted):")
    print(f"  {'model':<20} {'accuracy':>9} {'loss':>8}")
    for model, accuracy, loss in table:
        print(f"  {model:<20} {accuracy:>9.3f} {loss:>8.4f}")
    if len(table) >= 2:
        gain = table[-1][1] - table[0][1]
        verdict = "better than" if gain > 0 else "NOT better than"
        print(f"the final global model is {verdict} round 0: accuracy {table[0][1]:.3f} -> {table[-1][1]:.3f}")
    _print_files(data_dir, final, info, started_at)
    return 0


def run_fedmeki_demo(data_dir: Path, rounds: int = 3, silos: int = 3, delta_encoding: str = "float32") -> int:
    """The FedMEKI suite on the tiny configuration: silos federate the encoders, an injector injects them."""
    started_at = time.monotonic()
    data_dir = _fresh(data_dir)
    print(
        f"fedmeki demo (FedMEKI suite): {silos} silos + 1 injector, {rounds} rounds, files under {data_dir}",
        flush=True,
    )
    federation = write_synthetic_federation(
        "fedmeki", silos, 600, data_dir / "data", image_size=32, public_fraction=0.2, seed=7
    )
    with _processes() as processes:
        address = _coordinator_address(_launch_coordinator(processes, data_dir))
        agents = [_Agent(f"hospital-{chr(ord('a') + index)}", files) for index, files in enumerate(federation.silos)]
        # At the coordinator's site: the public share of the training tasks (half fine-tuning, half test) and
        # the zero-shot tasks' test data.
        _start_agents(processes, data_dir, address, [*agents, _Agent("injector", federation.injector, "injector", 0.5)])
        print(f"{silos} silos with 4 training tasks each, and an injector with all 8 (logs: {data_dir / 'logs'})")
        spec = parse_job_spec(
            {
                "name": "demo-fedmeki",
                "task": "fedmeki",
                "rounds": rounds,
                "min_silos": silos,
                "round_deadline_seconds": 600,
                "delta_encoding": delta_encoding,
                "model": {"architecture": "fedmeki-encoders-tiny"},
                "algorithm": {"name": "fedavg", "local_epochs": 2, "batch_size": 32, "learning_rate": 0.002},
                "injection": {"epochs": 4, "batch_size": 16, "learning_rate": 0.001},
            }
        )
        outcome = _follow_to_the_end(address, spec, data_dir)
    if outcome is None:
        return 1
    final, info = outcome
    print()
    print(format_report(final))
    _print_files(data_dir, final, info, started_at)
    return 0
