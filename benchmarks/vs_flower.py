"""The same round through Flower's real Deployment Runtime (one SuperLink, N SuperNodes), for `bench round --vs flower`.

    python -m benchmarks.vs_flower --params 100M --silos 2 --rounds 3

Flower is never a fedmeki dependency: it lives in its own virtual environment (`.venv-flower` in the checkout,
created on first use with flwr pinned as in benchmarks/flower_app/pyproject.toml). The Flower App
(benchmarks/flower_app) moves the same model (same float32 tensors) with the same "global + constant" client
and Flower's own FedAvg; its ServerApp records when each round's aggregate is ready. Round time is the median of
rounds 2..R, as in `bench round`. Peak memory: the ServerApp process (it holds the aggregate) and the SuperLink
(it relays every message), each as its own high-water mark. `bench wan --vs flower` passes `NodeRoutes`: each
SuperNode then runs in its own network namespace and dials the SuperLink through its own delay line.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from benchmarks.counts import parse_count
from benchmarks.memory import memory_kib
from benchmarks.scratch import scratch

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "benchmarks" / "flower_app"
FLOWER = "flwr==1.41.0"


def flower_env(venv: Path) -> Path:
    """The Flower environment's bin folder, made on first use."""
    bin_dir = venv / "bin"
    if not (bin_dir / "flower-superlink").exists():
        print(f"setting up {venv} with {FLOWER} (first use)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", FLOWER, "numpy"], check=True)
    return bin_dir


class NodeRoutes(Protocol):
    """Where each SuperNode runs and what it dials (`benchmarks.wan.Links`: a namespace and a delay line each)."""

    def addresses(self, target: str, silos: int) -> list[str]: ...

    def prefix(self, index: int) -> list[str]: ...

    def reaches(self, index: int, port: int) -> bool: ...


class Loopback:
    """Every SuperNode here, dialling the SuperLink itself."""

    def addresses(self, target: str, silos: int) -> list[str]:
        return [target] * silos

    def prefix(self, index: int) -> list[str]:
        return []

    def reaches(self, index: int, port: int) -> bool:
        return _listening(port)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(
    port: int, process: subprocess.Popen[bytes], log: Path, reaches: Callable[[int], bool], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"a Flower process exited early; see {log}")
        if reaches(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s; see {log}")


def run_flower_round(
    params: int, silos: int, rounds: int, tensors: int, venv: Path, routes: NodeRoutes | None = None
) -> dict[str, Any]:
    bin_dir = flower_env(venv)
    with scratch("fedmeki-bench-flower-") as work:
        return _run_flower(work, bin_dir, params, silos, rounds, tensors, routes or Loopback())


def _run_flower(
    work: Path, bin_dir: Path, params: int, silos: int, rounds: int, tensors: int, routes: NodeRoutes
) -> dict[str, Any]:
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    link_port = _free_port()
    (work / "flwr-home").mkdir()
    (work / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *command: str, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        log = work / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [*(prefix or []), *command], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work
            )
        processes.append(process)
        return process

    try:
        link = start(
            "superlink",
            str(bin_dir / "flower-superlink"),
            "--insecure",
            "--disable-runtime-dependency-installation",
            "--port",
            str(link_port),
        )
        _wait_listening(link_port, link, work / "superlink.log", _listening)
        dials = routes.addresses(f"127.0.0.1:{link_port}", silos)
        for index in range(silos):
            node_port = _free_port()
            node = start(
                f"supernode-{index}",
                str(bin_dir / "flower-supernode"),
                "--insecure",
                "--superlink",
                dials[index],
                "--port",
                str(node_port),
                "--node-config",
                f"index={index}",
                prefix=routes.prefix(index),
            )
            _wait_listening(node_port, node, work / f"supernode-{index}.log", functools.partial(routes.reaches, index))
        timings = work / "timings.json"
        run_config = (
            f"params={params} tensors={tensors} num-server-rounds={rounds} min-nodes={silos} timings-file='{timings}'"
        )
        with (work / "flwr-run.log").open("wb") as out:
            subprocess.run(
                [str(bin_dir / "flwr"), "run", str(APP), "bench", "--run-config", run_config, "--stream"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                check=True,
                timeout=3600,
            )
        if not timings.exists():
            raise RuntimeError(f"the Flower run wrote no timings; see {work / 'flwr-run.log'}")
        recorded = json.loads(timings.read_text())
        link_peak_kib = memory_kib(link.pid, "VmHWM")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    ready = recorded["ready"]  # before round 1, then after each round
    round_times = [after - before for before, after in itertools.pairwise(ready)]
    steady = round_times[1:] or round_times
    return {
        "flower": FLOWER,
        "params": params,
        "silos": silos,
        "rounds": rounds,
        "round_s": statistics.median(steady),
        "round_times_s": round_times,
        "serverapp_peak_rss_bytes": recorded["serverapp_peak_rss_kib"] * 1024,
        "superlink_peak_rss_bytes": link_peak_kib * 1024,
    }


def report(result: dict[str, Any]) -> None:
    print(
        f"Flower ({result['flower']}, SuperLink + {result['silos']} SuperNodes): round (median of rounds 2..R) "
        f"{result['round_s']:.3f}s; rounds {', '.join(f'{t:.3f}' for t in result['round_times_s'])}"
    )
    print(
        f"Flower peak RSS: ServerApp {result['serverapp_peak_rss_bytes'] / 2**20:.1f} MiB, "
        f"SuperLink {result['superlink_peak_rss_bytes'] / 2**20:.1f} MiB"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=parse_count, default=parse_count("10M"))
    parser.add_argument("--silos", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument("--flower-venv", type=Path, default=ROOT / ".venv-flower")
    args = parser.parse_args(argv)
    result = run_flower_round(args.params, args.silos, args.rounds, args.tensors, args.flower_venv)
    report(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
