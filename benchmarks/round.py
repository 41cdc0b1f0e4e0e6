"""One federated round at the speed of the wire: round time, its split, coordinator memory, raw-gRPC bound.

    python -m benchmarks.round --params 100M --silos 2 --rounds 3      (or: fedmeki bench round ...)

A real coordinator process and N silo processes on loopback move a model of `--params` float32 parameters;
training is replaced by "global + constant" (benchmarks/bench_silo.py) so only the platform is timed. In the
same run a minimal grpcio stream moves the same bytes with the same chunk size (benchmarks/raw_grpc.py):
that is the bound the round is compared to. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import vs_flower
from benchmarks.counts import parse_count
from benchmarks.memory import memory_kib
from benchmarks.proc_stats import cores, cpu_seconds
from benchmarks.scratch import scratch
from fedmeki_core.app.demo import add_silo
from fedmeki_core.client import FedmekiClient
from fedmeki_core.files import atomic_write
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import RoundSummary
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, TensorSpec, write_safetensors

TASK = "synthetic-vitals"


def write_model(path: Path, params: int, tensors: int) -> None:
    tensors = max(1, min(tensors, params))
    sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
    manifest = [TensorSpec(f"layers.{i:04d}.weight", "F32", (size,)) for i, size in enumerate(sizes)]
    buffer = np.full(max(sizes), 0.01, dtype=np.float32)
    with atomic_write(path) as f:
        write_safetensors(f, manifest, (buffer[:size] for size in sizes))


def start_python(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None, prefix: Sequence[str] = ()
) -> subprocess.Popen[str]:
    """`python args` (after `prefix`, as `nsenter ... --`) with its stdout piped."""
    with log.open("w") if log else open(os.devnull, "w") as stderr:
        return subprocess.Popen(
            [*prefix, sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )


def _phase(lines: list[dict[str, float]]) -> float:
    return max(line["end"] for line in lines) - min(line["start"] for line in lines)


def raw_bound(model_bytes: int, silos: int, chunk: int) -> dict[str, float]:
    """Seconds for N concurrent raw uploads, then N concurrent raw downloads, of the model's bytes."""
    server = start_python(["-m", "benchmarks.raw_grpc", "serve"])
    try:
        assert server.stdout is not None
        address = f"127.0.0.1:{server.stdout.readline().split()[1]}"
        result = {}
        for mode in ("upload", "download"):
            start_at = str(time.time() + 2.0 + 0.1 * silos)  # after every client process is up and connected
            clients = [
                start_python(["-m", "benchmarks.raw_grpc", mode, address, str(model_bytes), str(chunk), start_at])
                for _ in range(silos)
            ]
            lines = [json.loads(c.communicate()[0].strip().splitlines()[-1]) for c in clients]
            result[mode] = _phase(lines)
        return result
    finally:
        server.terminate()
        server.wait()


def run_round_benchmark(
    params: int, silos: int, rounds: int, chunk: int, tensors: int, keep_checkpoints: int = 0
) -> dict[str, Any]:
    with scratch("fedmeki-bench-round-") as work:
        return run_round(work, params, silos, rounds, chunk, tensors, keep_checkpoints)


SiloAddresses = Callable[[str, int], list[str]]  # (the coordinator's address, silos) -> the address each silo dials
SiloPrefix = Callable[[int], list[str]]  # silo index -> what its command runs behind (a network namespace's nsenter)


def run_round(
    work: Path,
    params: int,
    silos: int,
    rounds: int,
    chunk: int,
    tensors: int,
    keep_checkpoints: int,
    coordinator_env: dict[str, str] | None = None,
    silo_addresses: SiloAddresses | None = None,
    silo_prefix: SiloPrefix | None = None,
    encoding: str = "float32",
) -> dict[str, Any]:
    """One benchmark job; with `silo_addresses` the silos dial those (a link each) and no loopback bound is run. A
    lossy `encoding` (int8, topk) sends deltas in it both ways (`downloads: delta`)."""
    model = work / "initial.safetensors"
    write_model(model, params, tensors)
    model_bytes = model.stat().st_size
    coordinator = start_python(
        ["-m", "coordinator", "serve", "--address", "127.0.0.1:0", "--data-dir", str(work / "c")],
        {
            "FEDMEKI_COORDINATOR_CHUNK_BYTES": str(chunk),
            "FEDMEKI_COORDINATOR_KEEP_CHECKPOINTS": str(keep_checkpoints),
            **(coordinator_env or {}),
        },
        work / "coordinator.log",
    )
    agents: list[subprocess.Popen[str]] = []
    try:
        assert coordinator.stdout is not None
        address = re.search(r"(\d+\.\d+\.\d+\.\d+:\d+)", coordinator.stdout.readline()).group(1)  # type: ignore[union-attr]
        dials = silo_addresses(address, silos) if silo_addresses else [address] * silos
        for index in range(silos):
            token = add_silo(f"bench-{index}", "--data-dir", str(work / "c"))
            (work / f"silo-{index}").mkdir()
            agents.append(
                start_python(
                    [
                        "-m",
                        "benchmarks.bench_silo",
                        "--coordinator",
                        dials[index],
                        "--token",
                        token,
                        "--work-dir",
                        str(work / f"silo-{index}"),
                        "--rounds",
                        str(rounds),
                        "--chunk-bytes",
                        str(chunk),
                    ],
                    prefix=silo_prefix(index) if silo_prefix else (),
                )
            )
        for agent in agents:
            assert agent.stdout is not None and "ready" in agent.stdout.readline()
        time.sleep(0.5)
        idle_kib = memory_kib(coordinator.pid, "VmRSS")
        lossy = {"downloads": "delta"} if encoding in ("int8", "topk") else {}
        spec = parse_job_spec(
            {
                "name": "bench",
                "task": TASK,
                "rounds": rounds,
                "min_silos": silos,
                "round_deadline_seconds": 3600,
                "delta_encoding": encoding,
                **lossy,
            }
        )
        with FedmekiClient(address, chunk_bytes=chunk) as client:
            submit_started = time.time()
            job = client.submit_job(
                spec, model, check_model=False
            )  # synthetic tensors: the platform moves them by name and shape
            submit_s = time.time() - submit_started

            # every process's CPU as each round closes: rounds 2..R's work, as their median time is
            cpu_at: dict[int, tuple[float, float]] = {}  # (coordinator, silos)
            for event in client.watch_job(job.id):  # until the job ends
                if isinstance(event, RoundSummary) and event.closed_at is not None and event.number not in cpu_at:
                    silos_cpu = sum(cpu_seconds(agent.pid) for agent in agents)
                    cpu_at[event.number] = (cpu_seconds(coordinator.pid), silos_cpu)
            final = client.get_job(job.id)
        peak_kib = memory_kib(coordinator.pid, "VmHWM")
        silo_rounds: dict[int, list[dict[str, float]]] = {}
        for agent in agents:
            out, _ = agent.communicate(timeout=60)
            for line in out.strip().splitlines():
                record = json.loads(line)
                if "round" in record:
                    silo_rounds.setdefault(int(record["round"]), []).append(record)
    finally:
        for process in (*agents, coordinator):
            if process.poll() is None:
                process.terminate()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()
    if final.state.value != "completed":
        raise RuntimeError(f"benchmark job ended {final.state.value}: {final.reason}")
    per_round = []
    # The coordinator's own close times (same machine, same clock as the silos' timestamps).
    closed = {r.number: r.closed_at.timestamp() for r in final.rounds if r.closed_at is not None}
    for number in range(1, rounds + 1):
        committed = closed[number]
        opened = closed.get(number - 1, submit_started + submit_s)
        lines = silo_rounds[number]
        per_round.append(
            {
                "round": number,
                "round_s": committed - opened,
                "download_s": max(r["downloaded"] - r["start"] for r in lines),
                "local_s": max(r["local_done"] - r["downloaded"] for r in lines),
                "upload_s": max(r["uploaded"] - r["local_done"] for r in lines),
                "aggregate_commit_s": committed - max(r["uploaded"] for r in lines),
            }
        )
    steady = per_round[1:] or per_round
    round_s = statistics.median(r["round_s"] for r in steady)
    result: dict[str, Any] = {
        "params": params,
        "encoding": encoding,
        "keep_checkpoints": keep_checkpoints,
        "silos": silos,
        "rounds": rounds,
        "chunk_bytes": chunk,
        "model_bytes": model_bytes,
        "round_s": round_s,
        "split_s": {
            key: statistics.median(r[key] for r in steady)
            for key in ("download_s", "local_s", "upload_s", "aggregate_commit_s")
        },
        "submit_s": submit_s,
        "coordinator_idle_rss_bytes": idle_kib * 1024,
        "coordinator_peak_rss_above_idle_bytes": (peak_kib - idle_kib) * 1024,
        "per_round": per_round,
        # each silo's own download and upload, median of rounds 2..R (silos in the order they were started)
        "silo_s": [
            {
                "download_s": statistics.median(
                    silo_rounds[int(r["round"])][i]["downloaded"] - silo_rounds[int(r["round"])][i]["start"]
                    for r in steady
                ),
                "upload_s": statistics.median(
                    silo_rounds[int(r["round"])][i]["uploaded"] - silo_rounds[int(r["round"])][i]["local_done"]
                    for r in steady
                ),
            }
            for i in range(silos)
        ],
    }
    if rounds >= 2 and {1, rounds} <= cpu_at.keys():
        first, last = cpu_at[1], cpu_at[rounds]  # a round's CPU, rounds 2..R
        coordinator_cpu = (last[0] - first[0]) / (rounds - 1)
        silos_cpu = (last[1] - first[1]) / (rounds - 1)
        result["cpu_s_per_round"] = {"coordinator": coordinator_cpu, "silos": silos_cpu}
        # The cores' time for a round's work of the coordinator and the silos: no round fits in less here.
        result["cpu_floor_s"] = (coordinator_cpu + silos_cpu) / cores()
    if silo_addresses is None:
        bound = raw_bound(model_bytes, silos, chunk)
        result["grpc_bound_s"] = bound["upload"] + bound["download"]
        result["ratio"] = round_s / result["grpc_bound_s"]
        result["raw_upload_s"], result["raw_download_s"] = bound["upload"], bound["download"]
        if "cpu_floor_s" in result:
            result["cpu_floor_ratio"] = result["cpu_floor_s"] / result["grpc_bound_s"]
    return result


def report(result: dict[str, Any]) -> None:
    mib = result["model_bytes"] / 2**20
    print(
        f"model {result['params'] / 1e6:g}M params ({mib:.1f} MiB), {result['silos']} silos, "
        f"{result['rounds']} rounds, chunks of {result['chunk_bytes'] // 1024} KiB"
    )
    print(f"{'round':>5} {'total s':>8} {'download':>9} {'local':>7} {'upload':>7} {'agg+commit':>11}")
    for r in result["per_round"]:
        print(
            f"{r['round']:>5} {r['round_s']:>8.3f} {r['download_s']:>9.3f} {r['local_s']:>7.3f} "
            f"{r['upload_s']:>7.3f} {r['aggregate_commit_s']:>11.3f}"
        )
    print(
        f"raw gRPC, same bytes and chunks: upload {result['raw_upload_s']:.3f}s + download "
        f"{result['raw_download_s']:.3f}s = {result['grpc_bound_s']:.3f}s"
    )
    print(f"round time (median of rounds 2..R) {result['round_s']:.3f}s = {result['ratio']:.2f}x the raw-gRPC bound")
    if "cpu_floor_ratio" in result:
        print(
            f"CPU floor (coordinator and silos' CPU per round over the cores) {result['cpu_floor_s']:.3f}s = "
            f"{result['cpu_floor_ratio']:.2f}x the raw-gRPC bound (a round's CPU: coordinator "
            f"{result['cpu_s_per_round']['coordinator']:.2f}s, silos {result['cpu_s_per_round']['silos']:.2f}s)"
        )
    if "flower" in result:
        flower = result["flower"]
        vs_flower.report(flower)
        print(f"Flower's round takes {result['flower_ratio']:.1f}x fedmeki's (same model, same silos, same machine)")
    print(
        f"coordinator peak RSS above idle: {result['coordinator_peak_rss_above_idle_bytes'] / 2**20:.1f} MiB "
        f"({result['coordinator_peak_rss_above_idle_bytes'] / result['model_bytes']:.2f}x the model)"
    )
    summary = {k: v for k, v in result.items() if k != "per_round"}
    if "flower" in result:
        summary["flower"] = {k: v for k, v in result["flower"].items() if k != "round_times_s"}
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedmeki bench round", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=parse_count, default=parse_count("10M"))
    parser.add_argument("--silos", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument(
        "--keep-checkpoints",
        type=int,
        default=0,
        help="the coordinator's checkpoint retention (0 keeps every round's checkpoint)",
    )
    parser.add_argument(
        "--vs",
        choices=["flower"],
        help="also run the same model through Flower's Deployment Runtime (its own venv: benchmarks/vs_flower.py)",
    )
    args = parser.parse_args(argv)
    result = run_round_benchmark(
        args.params, args.silos, args.rounds, args.chunk_bytes, args.tensors, args.keep_checkpoints
    )
    if args.vs == "flower":
        result["flower"] = vs_flower.run_flower_round(
            args.params, args.silos, args.rounds, args.tensors, vs_flower.ROOT / ".venv-flower"
        )
        result["flower_ratio"] = result["flower"]["round_s"] / result["round_s"]
    report(result)


if __name__ == "__main__":
    main()
