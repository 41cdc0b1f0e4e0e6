"""Many silos on one coordinator: round time and its split against the raw-gRPC bound of the same N concurrent
transfers, job submission while N silos poll, the coordinator's threads, descriptors, memory and CPU, fairness.

    python -m benchmarks.scale --silos 2,16,64,128,256,512 --params 0.1M,10M --rounds 3 --out docs/scale
    (or: fedmeki bench scale ...)

Each point is one run (benchmarks/scale_run.py): the coordinator in its own process, N silos over at most
`--processes` processes, each silo with its own connection and credential (benchmarks/scale_silos.py), training
"global + constant". Round figures are medians of rounds 2..R. A point that would not fit this machine's memory,
disk or descriptors is skipped, and one that fails or runs past `--run-timeout` is recorded with why; the larger N
of the same model are then skipped. Writes scale.csv, scale.json, scale.md and scale.png to `--out`, incrementally.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any

from benchmarks.counts import parse_count
from benchmarks.scale_report import markdown_table, write_csv, write_plot
from benchmarks.scale_run import run_scale
from benchmarks.scratch import scratch
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES

MIB = 2**20


def _available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def fits(silos: int, model_bytes: int, rounds: int, processes: int) -> str | None:
    """Why this point would not fit the machine now, or None. Generous estimates: a point refused here would
    have pushed other work on a shared machine into swap or a full disk."""
    hosts = min(silos, processes)
    # each Python process ~150 MiB; per silo a channel, a thread and its HTTP/2 windows; the coordinator's
    # running sum (float64) and a few model-sized buffers
    memory = 300 + 150 * (hosts + 2) + 4 * silos + 6 * model_bytes / MIB
    if memory > _available_mib():
        return f"needs about {memory:.0f} MiB of memory, {_available_mib():.0f} MiB available"
    # per silo a downloaded checkpoint and a delta; the coordinator spools every update and keeps each checkpoint
    disk = (3 * silos + rounds + 2) * model_bytes / MIB
    free = shutil.disk_usage(tempfile.gettempdir()).free / MIB
    if disk > 0.8 * free:
        return f"needs about {disk:.0f} MiB of disk in {tempfile.gettempdir()}, {free:.0f} MiB free"
    descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if silos + 200 > descriptors:
        return f"the coordinator would need about {silos + 200} open files, the limit is {descriptors}"
    return None


def run_point(args: argparse.Namespace, params: int, silos: int) -> dict[str, Any]:
    model_bytes = 4 * params  # float32 (the header adds a few KiB)
    row: dict[str, Any] = {"silos": silos, "params": params, "model_bytes": model_bytes, "rounds": args.rounds}
    reason = fits(silos, model_bytes, args.rounds, args.processes)
    if reason:
        return {**row, "status": f"skipped: {reason}"}
    try:
        with scratch("fedmeki-bench-scale-") as work:
            result = run_scale(
                work,
                params,
                silos,
                args.rounds,
                args.chunk_bytes,
                args.tensors,
                args.processes,
                args.run_timeout,
                {f"FEDMEKI_COORDINATOR_{key.upper()}": value for key, value in args.coordinator_setting},
                args.out / f"memory-trace-{silos}-{params}.json" if args.trace_memory else None,
            )
    except Exception as exc:
        traceback.print_exc()
        return {**row, "status": f"failed: {exc}"}
    return {"status": "ok", **result}  # a run past its time says so itself


def _setting(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"not NAME=VALUE: {text!r}")
    return name, value


def _counts(text: str) -> list[int]:
    return [parse_count(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedmeki bench scale", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--silos", type=lambda t: [int(v) for v in t.split(",")], default=[2, 16, 64, 128, 256, 512])
    parser.add_argument("--params", type=_counts, default=_counts("0.1M,10M"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=4, help="silo processes at most (silos share them)")
    parser.add_argument("--run-timeout", type=float, default=900.0, help="seconds one point may take")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument(
        "--coordinator-setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a coordinator setting for every point, e.g. max_concurrent_polls=200 (repeatable)",
    )
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="run the coordinator under tracemalloc (slower) and write where its memory above idle goes, per point",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for params in args.params:
        stopped = ""  # a failed point's N: the larger ones of this model would fare no better
        for silos in args.silos:
            if stopped:
                row = {"silos": silos, "params": params, "model_bytes": 4 * params, "rounds": args.rounds}
                row["status"] = f"skipped: {stopped}"
            else:
                row = run_point(args, params, silos)
                if row["status"].startswith("failed"):
                    stopped = f"{silos} silos failed"
            rows.append(row)
            print(f"{params / 1e6:g}M params, {silos} silos: {_summary(row)}", flush=True)
            write_csv(rows, args.out / "scale.csv")
            (args.out / "scale.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown_table(rows)
    (args.out / "scale.md").write_text(table)
    write_plot(rows, args.out / "scale.png")
    print(table)
    print(f"table, CSV, JSON and plot in {args.out}/scale.(md|csv|json|png)")


def _summary(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return str(row["status"])
    return (
        f"round {row['round_s']:.3f}s, bound {row['grpc_bound_s']:.3f}s, ratio {row['ratio']:.2f}, "
        f"submit {row['submit_s']:.3f}s, threads {row['threads_peak']}, fds {row['fds_peak']}, "
        f"RSS +{row['rss_peak_above_idle_mib']:.1f} MiB, fairness {row['upload_fairness']:.2f}"
    )


if __name__ == "__main__":
    main()
