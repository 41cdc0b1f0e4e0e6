"""Writing a checkpoint computed tensor by tensor: hashed and written after each tensor (HashingWriter) against
hashed and written beside the computing (OverlappedHashingWriter), alternating, in one process.

    python -m benchmarks.checkpoint_write --params 100M --tensors 195 --repeats 5

Each tensor is computed as the commit computes FedAvg's (the current tensor plus a float64 mean delta, cast back
and checked finite), from a few source tensors kept in memory, and the file is written with `atomic_write` (a new
file each time, fsynced, as a checkpoint is). Prints each run and the median ratio overlapped / plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.counts import parse_count
from fedmeki_core.files import HashingWriter, atomic_write
from fedmeki_core.overlapped_writer import OverlappedHashingWriter
from fedmeki_core.wire import TensorSpec, write_safetensors

SOURCES = 4  # distinct source tensors, reused in turn: the computing reads memory that is already resident


def _tensors(sources: list[np.ndarray[Any, Any]], count: int) -> Iterator[np.ndarray[Any, Any]]:
    for index in range(count):
        current = sources[index % SOURCES]
        mean_delta = current.astype(np.float64) * 0.5
        new = (current + mean_delta).astype(np.float32)
        if not bool(np.isfinite(new).all()):
            raise ArithmeticError("not finite")
        yield new


def run_once(
    folder: Path, manifest: list[TensorSpec], sources: list[np.ndarray[Any, Any]], overlapped: bool
) -> dict[str, Any]:
    path = folder / "checkpoint.safetensors"
    started = time.perf_counter()
    with atomic_write(path) as f:
        if overlapped:
            with OverlappedHashingWriter(f) as writer:
                write_safetensors(writer, manifest, _tensors(sources, len(manifest)))
        else:
            writer = HashingWriter(f)  # type: ignore[assignment]
            write_safetensors(writer, manifest, _tensors(sources, len(manifest)))
    seconds = time.perf_counter() - started
    digest = writer.hexdigest()
    path.unlink()
    return {"writer": "overlapped" if overlapped else "plain", "seconds": seconds, "sha256": digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("100M"))
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    per = args.params // args.tensors
    manifest = [TensorSpec(f"t{i:04d}", "F32", (per,)) for i in range(args.tensors)]
    rng = np.random.default_rng(0)
    sources = [rng.standard_normal(per).astype(np.float32) for _ in range(SOURCES)]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedmeki-checkpoint-write-") as folder:
        for _ in range(args.repeats):
            for overlapped in (False, True):
                runs.append(run_once(Path(folder), manifest, sources, overlapped))
                print(json.dumps(runs[-1]), flush=True)
    if len({run["sha256"] for run in runs}) != 1:
        raise SystemExit("the two writers wrote different bytes")
    ratios = [after["seconds"] / before["seconds"] for before, after in zip(runs[::2], runs[1::2], strict=True)]
    print(json.dumps({"params": args.params, "tensors": args.tensors, "median_ratio": statistics.median(ratios)}))


if __name__ == "__main__":
    main()
