"""Real silo agents as separate processes (the `fedmeki-silo` command), for end-to-end tests."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file

from coordinator.server import Coordinator
from fedmeki_core.records import JobStatus
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic_vitals import generate

TASK = "synthetic-vitals"
# How long agents may take to be seen by the coordinator: each imports torch first, a minute and more on a loaded
# 2-core machine (60 s timed out at load 12-15 with the agents still silent).
AGENTS_SEEN_SECONDS = 180


@dataclass
class AgentProcess:
    name: str
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None, address_space_bytes: int | None = None) -> None:
        """Start the agent's process, its environment plus `env` (e.g. a crash point, fedmeki_core/faults.py); with
        `address_space_bytes`, a machine with that little memory (RLIMIT_AS: a larger allocation fails at once)."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "silo_agent", "--log-level", "INFO", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        if address_space_bytes is not None:  # set from outside: a preexec_fn can deadlock a process running gRPC
            resource.prlimit(self.process.pid, resource.RLIMIT_AS, (address_space_bytes, address_space_bytes))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def prepare_agent(
    coordinator_address: str,
    token: str,
    work_dir: Path,
    index: int,
    count: int,
    samples: int,
    kit: Path | None = None,
    extra: dict[str, object] | None = None,
) -> AgentProcess:
    """Synthetic non-IID data, enrollment with the token (or the startup kit instead), and a silo.yaml (plus
    `extra` settings); returns the (not started) agent."""
    data_file = work_dir / "data" / f"{TASK}.safetensors"
    save_dataset(generate(samples, silo_index=index, num_silos=count, seed=11), data_file)
    settings: dict[str, object] = {
        "coordinator": coordinator_address,
        "work_dir": str(work_dir),
        "device": "cpu",
        "data": {TASK: str(data_file)},
        "poll_wait_seconds": 2,
        "retry_max_seconds": 2,
        **(extra or {}),
    }
    if kit is not None:
        settings["kit"] = str(kit)
    else:
        _enroll(coordinator_address, token, work_dir)
    config = work_dir / "silo.yaml"
    config.write_text(yaml.safe_dump(settings))
    return AgentProcess(work_dir.name, config, work_dir / "agent.log")


def serve_coordinator(
    data_dir: Path, db: str, address: str, log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """A coordinator process (`python -m coordinator serve`) on `address` (port 0: a free one), its environment plus
    `env`, logging to `log`; returns it once it listens, with the address it listens on."""
    command = ["serve", "--address", address, "--data-dir", str(data_dir), "--db", db]
    with log.open("a") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "coordinator", *command],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"listening on ([\d.]+:\d+)", line)
    if match is None:
        process.kill()
        process.wait()
        process.stdout.close()
        raise AssertionError(f"coordinator did not start: {line!r}\n{log.read_text()}")
    return process, match.group(1)


def stop_coordinator(process: subprocess.Popen[str]) -> int:
    """SIGTERM a process of `serve_coordinator` (or reap it, if it died), wait for it and close its pipe; its code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    assert process.stdout is not None
    process.stdout.close()
    return code


def _enroll(coordinator_address: str, token: str, work_dir: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "silo_agent",
            "enroll",
            "--coordinator",
            coordinator_address,
            "--token",
            token,
            "--work-dir",
            str(work_dir),
        ],
        check=True,
        capture_output=True,
    )


@contextmanager
def running_agents(
    coordinator: Coordinator,
    root: Path,
    samples: tuple[int, ...],
    kits: Path | None = None,
    settings: dict[str, object] | None = None,
    roles: tuple[str, ...] = (),
    data: Sequence[dict[str, Path]] = (),
) -> Iterator[list[AgentProcess]]:
    """Register and start one agent `silo-<i>` per entry of `samples` (as `roles[i]`, default trainer), enrolled by
    token or, given `kits` (a provisioned project folder), by the kit `kits/silo-<i>`; silo.yaml gets `settings`
    too, and `data[i]` (task -> file) as its data instead of the synthetic set. Stops them all after."""
    address = f"127.0.0.1:{coordinator.port}"
    agents = []
    for index, count in enumerate(samples):
        name = f"silo-{index}"
        _, token = coordinator.registry.add(name, roles[index] if roles else "trainer")
        kit = kits / name if kits else None
        own = {"data": {task: str(path) for task, path in data[index].items()}} if data else {}
        extra = {**(settings or {}), **own}
        agents.append(prepare_agent(address, token, root / name, index, len(samples), count, kit, extra))
    for agent in agents:
        agent.start()
    try:
        yield agents
    finally:
        for agent in agents:
            agent.stop()


def wait_until(predicate, timeout: float, describe) -> None:  # type: ignore[no-untyped-def]
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out: {describe()}")
        time.sleep(0.1)


def recompute_round(previous: Path, updates: list[tuple[Path, int]], block_size: int = 0) -> dict[str, np.ndarray]:
    """FedAvg by hand: previous + sum(n_i * delta_i) / sum(n_i), in float64; an int8 delta's blocks hold
    `block_size` values."""
    base = load_file(str(previous))
    total = sum(n for _, n in updates)
    result = {name: value.astype(np.float64) for name, value in base.items()}
    for path, samples in updates:  # torch reads every encoding, bfloat16 included
        stored = {name: value.double().numpy() for name, value in torch_load_file(str(path)).items()}
        for name in result:
            result[name] += _decoded(stored, name, result[name].shape, block_size) * samples / total
    return result


def _decoded(stored: dict[str, np.ndarray], name: str, shape: tuple[int, ...], block_size: int) -> np.ndarray:
    """A delta tensor from its entries, whatever its encoding (int8 and topk as docs/architecture.md lays out)."""
    if f"{name}.__scale" in stored:
        flat = stored[name].reshape(-1)
        return (flat * np.repeat(stored[f"{name}.__scale"], block_size)[: flat.size]).reshape(shape)
    if f"{name}.__indices" in stored:
        dense = np.zeros(int(np.prod(shape)))
        dense[stored[f"{name}.__indices"].astype(np.int64)] = stored[name]
        return dense.reshape(shape)
    return stored[name]


def describe_job(status: JobStatus) -> str:
    return f"{status.state.value} round {status.current_round} {status.reason} " + "; ".join(
        f"r{r.number} {r.state.value} {r.reported_silos}/{r.selected_silos}" for r in status.rounds
    )
