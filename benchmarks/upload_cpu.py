"""The coordinator's CPU per upload, outside gRPC: validating the update's bytes as they arrive and folding it into
the round's running sum, for a model of `--params` float32 parameters in `--tensors` tensors.

    python -m benchmarks.upload_cpu --params 0.1M --tensors 195 --uploads 256

A model of many small tensors costs per tensor, not per byte: this is the figure that a 256-silo round of a
0.1M-parameter model multiplies by 256 (docs/benchmarks.md, "Scale"). Process CPU time, one thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.counts import parse_count
from benchmarks.round import write_model
from benchmarks.scratch import scratch
from coordinator.aggregation import RoundAccumulator
from fedmeki_core.stream_validation import ExpectedLayout, SafetensorsStreamValidator
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, read_manifest


def validate_ms(path: Path, uploads: int, chunk_bytes: int) -> float:
    data = path.read_bytes()
    layout = ExpectedLayout(read_manifest(path))  # as the coordinator derives it: once per job
    started = time.process_time()
    for _ in range(uploads):
        validator = SafetensorsStreamValidator(layout, len(data))
        for start in range(0, len(data), chunk_bytes):
            validator.feed(data[start : start + chunk_bytes])
        validator.finish()
    return (time.process_time() - started) / uploads * 1e3


def fold_ms(path: Path, uploads: int) -> float:
    silos = [f"silo-{index:05d}" for index in range(uploads)]
    accumulator = RoundAccumulator(read_manifest(path), silos)
    started = time.process_time()
    for silo in silos:  # in the fold's order: each is folded as it is offered
        accumulator.offer(silo, path, 1.0)
    return (time.process_time() - started) / uploads * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=parse_count, default=parse_count("0.1M"))
    parser.add_argument("--tensors", type=int, default=195)
    parser.add_argument("--uploads", type=int, default=256)
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    args = parser.parse_args()
    with scratch("fedmeki-upload-cpu-") as work:
        model = work / "update.safetensors"
        write_model(model, args.params, args.tensors)
        validated = validate_ms(model, args.uploads, args.chunk_bytes)
        folded = fold_ms(model, args.uploads)
    print(
        f"{args.params} params in {args.tensors} tensors, {args.uploads} uploads: "
        f"validate {validated:.2f} ms, fold {folded:.2f} ms CPU per upload"
    )


if __name__ == "__main__":
    main()
