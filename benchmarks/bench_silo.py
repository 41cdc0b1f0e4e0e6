"""A silo whose training is replaced by "the global weights plus a constant", so only the platform is timed.

    python -m benchmarks.bench_silo --coordinator ADDRESS --token T --work-dir DIR --rounds R

A job in a lossy delta encoding (int8, topk) gets its delta in that encoding and, with `downloads: delta`, its
global models as deltas from the one it holds (silo_agent/delta_downloads.py), as the agent does.

Prints one JSON line per round with its timestamps (download, local step, upload).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.encodings import DeltaEncoding, EncodedPart, encode_tensor, encoded_manifest
from fedmeki_core.files import atomic_write, recycle
from fedmeki_core.overlapped_writer import OverlappedHashingWriter
from fedmeki_core.records import RoundKind
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, TensorSpec, write_safetensors
from silo_agent.delta_downloads import DeltaDownloads
from silo_agent.transport import GrpcTransport

TASK = "synthetic-vitals"


def constant_tensors(manifest: list[TensorSpec], value: float) -> Iterator[np.ndarray[Any, Any]]:
    """The delta of "global + constant": one reused buffer, a view per tensor."""
    largest = max(spec.nbytes for spec in manifest) // 4
    buffer = np.full(largest, value, dtype=np.float32)
    for spec in manifest:
        yield buffer[: spec.nbytes // 4].reshape(spec.shape)


def encoded_tensors(
    manifest: list[TensorSpec], value: float, encoding: DeltaEncoding
) -> Iterator[np.ndarray[Any, Any]]:
    """The entries of the constant delta in a lossy encoding (`encoded_manifest` order)."""
    parts = encoded_manifest(manifest, encoding)
    for index, delta in enumerate(constant_tensors(manifest, value)):
        part = parts[2 * index]
        assert isinstance(part, EncodedPart)
        yield from encode_tensor(delta, part, encoding)[0]


def run_rounds(transport: GrpcTransport, work_dir: Path, rounds: int, emit: Callable[[dict[str, float]], None]) -> None:
    """Poll, download, add the constant, upload, for `rounds` training rounds and the evaluation round; `emit` gets
    each training round's timestamps."""
    done = 0
    spare = work_dir / "spare.safetensors"
    spare_download = work_dir / "spare-download.safetensors"
    while done <= rounds:  # the training rounds, then the evaluation round
        task = transport.next_task([TASK], "cpu", 30)
        if task is None:
            continue
        started = time.time()
        checkpoint = work_dir / f"global-{task.checkpoint.round}.safetensors"
        encoding = DeltaEncoding.of(task.spec)
        if task.spec.downloads == "delta":
            DeltaDownloads(transport, work_dir).download(task, checkpoint, spare_download)
        else:
            transport.download(task.checkpoint, checkpoint, spare=spare_download)
        downloaded = time.time()
        if task.kind == RoundKind.EVALUATE:
            transport.report_evaluation(task, 1, {"eval_accuracy": 0.5})
            done += 1
            continue
        order = sorted(task.manifest, key=lambda spec: spec.name)
        delta = work_dir / f"delta-{task.round}.safetensors"
        with atomic_write(delta, reuse=spare) as f, OverlappedHashingWriter(f) as writer:  # as the agent writes
            if encoding.feedback:
                wire = encoded_manifest(order, encoding)
                write_safetensors(writer, wire, encoded_tensors(order, 0.001 * task.round, encoding))
            else:
                write_safetensors(writer, order, constant_tensors(order, 0.001 * task.round))
        local_done = time.time()
        transport.upload(task, delta, writer.hexdigest(), 100, {"eval_accuracy": 0.5}, fresh=True)
        uploaded = time.time()
        recycle(checkpoint, spare_download)  # as the agent does: a held global model's file is only unlinked
        delta.replace(spare)
        emit(
            {
                "round": task.round,
                "start": started,
                "downloaded": downloaded,
                "local_done": local_done,
                "uploaded": uploaded,
            }
        )
        done += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    args = parser.parse_args()
    enrollment = GrpcTransport(args.coordinator).enroll(args.token)
    transport = GrpcTransport(args.coordinator, enrollment.credential, args.chunk_bytes, retry_max_seconds=60)
    transport.next_task([TASK], "cpu", 0)  # declare the task: the silo is now eligible
    print(json.dumps({"ready": time.time()}), flush=True)
    run_rounds(transport, args.work_dir, args.rounds, lambda record: print(json.dumps(record), flush=True))
    transport.close()


if __name__ == "__main__":
    main()
