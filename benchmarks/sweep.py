"""Round time against model size and against the number of silos: a table (Markdown, CSV) and a PNG plot.

    python -m benchmarks.sweep --params-list 1M,10M,100M,400M --silos-list 2,4,8,16 --out docs/sweep
    (or: fedmeki bench sweep ...)

Each point is one `benchmarks.round` run (median of rounds 2..R, with its own raw-gRPC bound).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

from benchmarks.counts import parse_count
from benchmarks.round import run_round_benchmark
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES

_COLUMNS = (
    "params",
    "silos",
    "model_bytes",
    "round_s",
    "grpc_bound_s",
    "ratio",
    "coordinator_peak_rss_above_idle_bytes",
)


def _counts(text: str) -> list[int]:
    return [parse_count(part) for part in text.split(",") if part]


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "round-sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| params | silos | model MiB | round s | raw-gRPC bound s | ratio | coordinator peak above idle MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['params'] / 1e6:g}M | {r['silos']} | {r['model_bytes'] / 2**20:.1f} | {r['round_s']:.3f} | "
            f"{r['grpc_bound_s']:.3f} | {r['ratio']:.2f} | "
            f"{r['coordinator_peak_rss_above_idle_bytes'] / 2**20:.1f} |"
        )
    (out / "round-sweep.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_size, by_silos) = plt.subplots(1, 2, figsize=(11, 4.2))
    sizes = [r for r in rows if r["sweep"] == "size"]
    silos = [r for r in rows if r["sweep"] == "silos"]
    for axis, points, key, label in (
        (by_size, sizes, "model_bytes", "model size (MiB)"),
        (by_silos, silos, "silos", "silos"),
    ):
        xs = [p[key] / 2**20 if key == "model_bytes" else p[key] for p in points]
        axis.plot(xs, [p["round_s"] for p in points], "o-", label="fedmeki round")
        axis.plot(xs, [p["grpc_bound_s"] for p in points], "s--", label="raw gRPC, same bytes")
        axis.set_xlabel(label)
        axis.set_ylabel("seconds")
        axis.grid(alpha=0.3)
        axis.legend()
    by_size.set_title(f"round time vs model size ({sizes[0]['silos'] if sizes else '-'} silos)")
    by_silos.set_title(f"round time vs silos ({silos[0]['params'] / 1e6:g}M params)" if silos else "")
    figure.tight_layout()
    figure.savefig(out / "round-sweep.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedmeki bench sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params-list", type=_counts, default=_counts("1M,10M,100M,400M"))
    parser.add_argument("--silos-list", type=lambda t: [int(v) for v in t.split(",")], default=[2, 4, 8, 16])
    parser.add_argument("--size-sweep-silos", type=int, default=2)
    parser.add_argument("--silo-sweep-params", type=parse_count, default=parse_count("10M"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    plan = [("size", p, args.size_sweep_silos) for p in args.params_list]
    plan += [("silos", args.silo_sweep_params, s) for s in args.silos_list]
    for sweep, params, silos in plan:
        result = run_round_benchmark(params, silos, args.rounds, DEFAULT_CHUNK_BYTES, args.tensors)
        result["sweep"] = sweep
        rows.append(result)
        print(
            f"{sweep:>5}: {params / 1e6:g}M params, {silos} silos: round {result['round_s']:.3f}s, "
            f"bound {result['grpc_bound_s']:.3f}s, ratio {result['ratio']:.2f}",
            flush=True,
        )
    write_outputs(rows, args.out)
    print(f"table, CSV and plot in {args.out}/round-sweep.(md|csv|png)")


if __name__ == "__main__":
    main()
