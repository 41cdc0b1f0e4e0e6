"""One run of `fedmeki bench scale`: a coordinator process, N silos over a few processes, a job of R rounds.

Reads the coordinator from /proc (threads, open descriptors, RSS, CPU time) and its database (rows inserted), and
times, in the same run, the raw-gRPC bound of the same N concurrent transfers from the same number of processes.
The CPU of every party (coordinator, silo processes, the raw transfers' processes) gives the round's CPU floor on
this machine: the time its cores need for that work, however well it overlapped.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import signal
import statistics
import subprocess
import time
from pathlib import Path
from select import select as wait_readable
from typing import Any

from sqlalchemy import MetaData, create_engine, func, select

from benchmarks.memory import memory_kib
from benchmarks.proc_stats import PeakWatch, cores, cpu_seconds, open_fds, open_sockets, threads
from benchmarks.round import TASK, start_python, write_model
from coordinator.settings import default_sqlite_url
from coordinator.silos import SiloRegistry
from coordinator.store.database import Database
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.records import JobStatus


def _groups(silos: int, processes: int) -> list[range]:
    """Silo indices split as evenly as can be over at most `processes` processes."""
    count = min(silos, processes)
    per = math.ceil(silos / count)
    return [range(start, min(start + per, silos)) for start in range(0, silos, per)]


def _phase(lines: list[dict[str, float]]) -> float:
    return max(line["end"] for line in lines) - min(line["start"] for line in lines)


def raw_bound(model_bytes: int, silos: int, processes: int, chunk: int) -> dict[str, float]:
    """Seconds for N concurrent raw uploads, then N concurrent raw downloads, of the model's bytes, each over its
    own connection, from the processes the silos run in; and the CPU seconds the transfers took (`cpu`: the
    clients' from the moment they start, the server's while they run; not the processes' start-up)."""
    server = start_python(["-m", "benchmarks.raw_grpc", "serve"])
    try:
        assert server.stdout is not None
        address = f"127.0.0.1:{server.stdout.readline().split()[1]}"
        result = {"cpu": 0.0}
        for mode in ("upload", "download"):
            start_at = str(time.time() + 3.0 + 0.05 * silos)  # after every client is up and connected
            sizes = [str(len(group)) for group in _groups(silos, processes)]
            command = ["-m", "benchmarks.raw_grpc", "many", mode, address, str(model_bytes), str(chunk), start_at]
            server_cpu = cpu_seconds(server.pid)
            clients = [start_python([*command, size]) for size in sizes]
            lines = [json.loads(line) for c in clients for line in c.communicate()[0].strip().splitlines()]
            result["cpu"] += cpu_seconds(server.pid) - server_cpu + sum(line.pop("cpu_s", 0.0) for line in lines)
            lines = [line for line in lines if line]  # the transfers' lines, without the processes' CPU lines
            if len(lines) != silos:
                raise RuntimeError(f"raw gRPC {mode}: {len(lines)} of {silos} transfers finished")
            result[mode] = _phase(lines)
        return result
    finally:
        server.terminate()
        server.wait()


def table_rows(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        tables = MetaData()
        tables.reflect(engine)
        with engine.connect() as connection:
            return {
                name: int(connection.execute(select(func.count()).select_from(table)).scalar_one())
                for name, table in tables.tables.items()
                if name != "alembic_version"
            }
    finally:
        engine.dispose()


def _register(url: str, silos: int) -> dict[int, str]:
    """The silos, registered as `fedmeki-coordinator silo add` does, in this process (not one process each)."""
    database = Database(url)
    try:
        registry = SiloRegistry(database)
        return {index: registry.add(f"scale-{index}")[1] for index in range(silos)}
    finally:
        database.dispose()


def _ready(host: subprocess.Popen[str], deadline: float) -> bool:
    """Whether the silo process says its silos are ready (False: it ended first); waits until `deadline` at most."""
    assert host.stdout is not None
    if not wait_readable([host.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        raise TimeoutError("the silos were not all enrolled and polling when the run's time was up")
    return "ready" in host.stdout.readline()


def _wait_finished(client: FedmekiClient, job_id: str, deadline: float) -> JobStatus:
    while True:
        job = client.get_job(job_id)
        if job.state.finished:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"the job had not finished (round {job.current_round}) when the run's time was up")
        # Seldom: a 256-silo job's status is a large answer, and at 0.5 s it was 4.5% of the coordinator's samples;
        # the round figures come from the rounds' own close times, not from when this notices the end.
        time.sleep(2.0)


def _records(work: Path, hosts: int) -> dict[int, list[dict[str, float]]]:
    """Each round's lines from every silo; a silo's error ends the run with it."""
    by_round: dict[int, list[dict[str, float]]] = {}
    for host in range(hosts):
        for line in (work / f"host-{host}" / "records.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "error" in record:
                raise RuntimeError(f"silo {record['silo']}: {record['error']}")
            by_round.setdefault(int(record["round"]), []).append(record)
    return by_round


def _round_figures(job: JobStatus, submitted: float, by_round: dict[int, list[dict[str, float]]]) -> dict[str, Any]:
    closed = {r.number: r.closed_at.timestamp() for r in job.rounds if r.closed_at is not None}
    per_round = []
    for number in sorted(by_round):
        lines = by_round[number]
        opened = closed.get(number - 1, submitted)
        # when each silo's update was in, from the round's opening: a silo that waits for its task (a poll slot)
        # or for an upload slot shows here
        completions = [line["uploaded"] - opened for line in lines]
        per_round.append(
            {
                "round_s": closed[number] - opened,
                "dispatch_download_s": max(line["downloaded"] for line in lines) - opened,
                "upload_phase_s": max(line["uploaded"] for line in lines) - min(line["local_done"] for line in lines),
                "commit_s": closed[number] - max(line["uploaded"] for line in lines),
                "upload_fairness": max(completions) / statistics.median(completions),
            }
        )
    steady = per_round[1:] or per_round  # round 1 also carries the job's start
    figures: dict[str, Any] = {
        key: statistics.median(r[key] for r in steady)
        for key in ("round_s", "dispatch_download_s", "upload_phase_s", "commit_s")
    }
    figures["upload_fairness"] = max(r["upload_fairness"] for r in steady)
    figures["per_round"] = per_round
    return figures


def run_scale(
    work: Path,
    params: int,
    silos: int,
    rounds: int,
    chunk: int,
    tensors: int,
    processes: int,
    timeout: float,
    coordinator_env: dict[str, str] | None = None,
    memory_trace: Path | None = None,
) -> dict[str, Any]:
    """The figures of one run (see benchmarks/scale_report.py for what each means); a job that does not finish in
    `timeout` seconds gives the figures read until then, with its status. With `memory_trace`, the coordinator runs
    under tracemalloc (`benchmarks/traced_coordinator.py`) and writes there where its memory above idle went."""
    # The client builds a job's initial weights with torch, imported on first use (seconds on a loaded machine):
    # imported before the clock starts, so that submit_s is the coordinator's time.
    importlib.import_module("fedmeki_core.models.build")
    model = work / "initial.safetensors"
    write_model(model, params, tensors)
    model_bytes = model.stat().st_size
    deadline = time.monotonic() + timeout
    traced = {"FEDMEKI_TRACE_OUT": str(memory_trace)} if memory_trace else {}
    coordinator = start_python(
        [
            "-m",
            "benchmarks.traced_coordinator" if memory_trace else "coordinator",
            *("serve", "--address", "127.0.0.1:0", "--data-dir", str(work / "c")),
        ],
        {"FEDMEKI_COORDINATOR_CHUNK_BYTES": str(chunk), **(coordinator_env or {}), **traced},
        work / "coordinator.log",
    )
    hosts: list[subprocess.Popen[str]] = []
    url = default_sqlite_url(work / "c")
    try:
        assert coordinator.stdout is not None
        address = re.search(r"(\d+\.\d+\.\d+\.\d+:\d+)", coordinator.stdout.readline()).group(1)  # type: ignore[union-attr]
        base_kib, base_sockets = memory_kib(coordinator.pid, "VmRSS"), open_sockets(coordinator.pid)
        tokens = _register(url, silos)
        groups = _groups(silos, processes)
        for host, group in enumerate(groups):
            folder = work / f"host-{host}"
            folder.mkdir()
            (folder / "tokens.json").write_text(json.dumps({i: tokens[i] for i in group}))
            arguments = ["--coordinator", address, "--tokens", str(folder / "tokens.json"), "--work-dir", str(folder)]
            arguments += ["--rounds", str(rounds), "--chunk-bytes", str(chunk)]
            hosts.append(start_python(["-m", "benchmarks.scale_silos", *arguments], log=work / f"host-{host}.log"))
        for host, process in enumerate(hosts):
            if not _ready(process, deadline):  # it ended early: its records say why
                _records(work, len(hosts))
                raise RuntimeError(f"silo process {host} ended before its silos were ready (see host-{host}.log)")
        time.sleep(1.0)  # every silo back in its long poll
        idle: dict[str, Any] = {
            "rss_kib": memory_kib(coordinator.pid, "VmRSS"),
            "threads": threads(coordinator.pid),
            "fds": open_fds(coordinator.pid),
            "sockets": open_sockets(coordinator.pid),
            "rows": table_rows(url),
            "cpu_s": cpu_seconds(coordinator.pid),
            "silo_cpu_s": sum(cpu_seconds(host.pid) for host in hosts),
        }
        if memory_trace:
            coordinator.send_signal(signal.SIGUSR1)  # idle: the tracer's first snapshot
        spec = parse_job_spec(
            {"name": "scale", "task": TASK, "rounds": rounds, "min_silos": silos, "round_deadline_seconds": 3600}
        )
        with PeakWatch(coordinator.pid) as peaks, FedmekiClient(address, chunk_bytes=chunk) as client:
            submitted = time.time()
            job = client.submit_job(spec, model, check_model=False)  # synthetic tensors, moved by name and shape
            submit_s = time.time() - submitted
            try:
                final: JobStatus | None = _wait_finished(client, job.id, deadline)
            except TimeoutError as exc:  # what the coordinator showed until then is still worth reporting
                final, late = None, str(exc)
        load = {
            "submit_s": submit_s,
            "threads_idle": idle["threads"],
            "threads_peak": peaks.peak_threads,
            "fds_idle": idle["fds"],
            "fds_peak": peaks.peak_fds,
            "sockets_per_waiting_silo": (idle["sockets"] - base_sockets) / silos,
            "rss_idle_mib": idle["rss_kib"] / 1024,
            "rss_peak_above_idle_mib": (memory_kib(coordinator.pid, "VmHWM") - idle["rss_kib"]) / 1024,
            "rss_per_waiting_silo_kib": (idle["rss_kib"] - base_kib) / silos,
        }
        if final is not None:
            cpu_s = cpu_seconds(coordinator.pid) - idle["cpu_s"]
            # read before they are waited for (an ended, unwaited process keeps its figures in /proc)
            silo_cpu_s = sum(cpu_seconds(host.pid) for host in hosts) - idle["silo_cpu_s"]
            for process in hosts:
                process.wait(timeout=max(10.0, deadline - time.monotonic()))
            rows = table_rows(url)
    finally:
        for process in (*hosts, coordinator):
            if process.poll() is None:
                process.terminate()
                process.wait()
    point = {"silos": silos, "params": params, "model_bytes": model_bytes, "rounds": rounds, "processes": len(groups)}
    if final is None:
        return {**point, **load, "status": f"failed: {late}"}
    if final.state.value != "completed":
        raise RuntimeError(f"the job ended {final.state.value}: {final.reason}")
    result: dict[str, Any] = {
        **point,
        **_round_figures(final, submitted + submit_s, _records(work, len(hosts))),
        **load,
        # every round of the job (training and evaluation), every silo: polls, downloads, uploads, commits
        "cpu_s_per_silo_round": cpu_s / ((rounds + 1) * silos),
        "silo_cpu_s_per_silo_round": silo_cpu_s / ((rounds + 1) * silos),
        # the cores' time for one round's work of every process, the evaluation round averaged in (it is lighter,
        # so a training round needs at least this)
        "cpu_floor_s": (cpu_s + silo_cpu_s) / ((rounds + 1) * cores()),
        "bytes_per_round": 2 * silos * model_bytes,  # each silo downloads the global model and uploads its update
        "db_rows_per_round": (sum(rows.values()) - sum(idle["rows"].values())) / (rounds + 1),
        "db_rows_by_table": {name: rows[name] - idle["rows"].get(name, 0) for name in rows},
    }
    bound = raw_bound(model_bytes, silos, len(groups), chunk)
    result["raw_upload_s"], result["raw_download_s"] = bound["upload"], bound["download"]
    result["grpc_bound_s"] = bound["upload"] + bound["download"]
    result["ratio"] = result["round_s"] / result["grpc_bound_s"]
    result["raw_cpu_s_per_silo"] = bound["cpu"] / silos  # one upload and one download, as a silo's round moves
    result["cpu_floor_ratio"] = result["cpu_floor_s"] / result["grpc_bound_s"]
    return result
