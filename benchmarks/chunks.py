"""Chunk size against round time and coordinator memory: how the default chunk size was chosen.

    python -m benchmarks.chunks --params 10M --silos 16 --chunks 64K,256K,1M,4M     (or: fedmeki bench chunks ...)

Each chunk size is one `benchmarks.round` run (median of rounds 2..R, its own raw-gRPC bound with the same chunk
size); the sizes run in the order given, then once more in reverse, so that drift on a shared machine shows.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.counts import parse_count
from benchmarks.round import run_round_benchmark


def _sizes(text: str) -> list[int]:
    units = {"K": 1 << 10, "M": 1 << 20}
    return [int(part[:-1]) * units[part[-1].upper()] if part[-1].isalpha() else int(part) for part in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedmeki bench chunks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=parse_count, default=parse_count("10M"))
    parser.add_argument("--silos", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument("--chunks", type=_sizes, default=_sizes("64K,256K,1M,4M"))
    args = parser.parse_args(argv)
    print(f"{args.params / 1e6:g}M params, {args.silos} silos, {args.rounds} rounds a run")
    print(f"{'chunk':>8} {'round s':>8} {'bound s':>8} {'ratio':>6} {'upload s':>9} {'peak above idle MiB':>20}")
    for chunk in [*args.chunks, *reversed(args.chunks)]:
        result = run_round_benchmark(args.params, args.silos, args.rounds, chunk, args.tensors)
        print(
            f"{chunk // 1024:>7}K {result['round_s']:>8.3f} {result['grpc_bound_s']:>8.3f} {result['ratio']:>6.2f} "
            f"{result['split_s']['upload_s']:>9.3f} {result['coordinator_peak_rss_above_idle_bytes'] / 2**20:>20.1f}",
            flush=True,
        )
        print(json.dumps({k: v for k, v in result.items() if k != "per_round"}), flush=True)


if __name__ == "__main__":
    main()
