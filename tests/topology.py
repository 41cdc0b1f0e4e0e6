"""The deployment as local processes: the `fedmeki-coordinator serve` command in its own process, beside the
silo agents' (tests/agents.py), as deploy/compose.yaml runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.silos import SiloRegistry
from coordinator.store.database import Database
from tests.agents import AgentProcess, wait_until

_LISTENING = re.compile(r"listening on [^\s]+:(\d+)")
_METRICS = re.compile(r"Prometheus metrics on port (\d+)")
_HEALTH = re.compile(r"health on port (\d+)")
_DASHBOARD = re.compile(r"dashboard on port (\d+)")


@dataclass
class CoordinatorProcess:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    port: int = 0
    metrics_port: int | None = None
    health_port: int | None = None
    dashboard_port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@contextmanager
def coordinator_process(
    folder: Path, serve_args: list[str], log_args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> Iterator[CoordinatorProcess]:
    """`fedmeki-coordinator [log_args] serve --address 127.0.0.1:0 [serve_args]` with `env` added to the
    environment, its stdout and stderr in files under `folder`; yields once it listens, stops it with SIGTERM
    afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    stdout, stderr = folder / "coordinator.out", folder / "coordinator.err"
    command = [sys.executable, "-m", "coordinator", *log_args, "serve", "--address", "127.0.0.1:0", *serve_args]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen(
            command, stdout=out, stderr=err, env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        )
    running = CoordinatorProcess(process, stdout, stderr)
    try:
        wait_until(
            lambda: process.poll() is not None or _LISTENING.search(stdout.read_text()) is not None,
            60,
            running.output,
        )
        listening = _LISTENING.search(stdout.read_text())
        assert listening is not None, f"the coordinator exited with {process.returncode}:\n{running.output()}"
        running.port = int(listening.group(1))
        if (metrics := _METRICS.search(stdout.read_text())) is not None:
            running.metrics_port = int(metrics.group(1))
        if (health := _HEALTH.search(stdout.read_text())) is not None:
            running.health_port = int(health.group(1))
        if (dashboard := _DASHBOARD.search(stdout.read_text())) is not None:
            running.dashboard_port = int(dashboard.group(1))
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_silos(database_url: str, agents: list[AgentProcess], timeout: float = 120) -> None:
    """Until every agent has called the coordinator (with a kit, its first call enrolls it)."""
    database = Database(database_url)
    try:
        wait_until(
            lambda: sum(silo.last_seen_at is not None for silo in SiloRegistry(database).list()) == len(agents),
            timeout,
            lambda: "\n".join(agent.output()[-2000:] for agent in agents),
        )
    finally:
        database.dispose()
