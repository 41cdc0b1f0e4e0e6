"""Coordinator memory while several silos upload a large delta at the same time.

Starts a real coordinator process on loopback, enrolls N silos, submits a job whose model has
`--mib` MiB of float32 weights, and has every silo stream its delta concurrently. Reports the
coordinator's resident memory at idle and its high-water mark (VmHWM, what `/usr/bin/time -v` calls
"Maximum resident set size"), next to the delta size.

    .venv/bin/python -m benchmarks.upload_memory --mib 128 --silos 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from safetensors.numpy import save_file

from benchmarks.memory import memory_kib
from benchmarks.scratch import scratch
from fedmeki_core import convert
from fedmeki_core.app.demo import add_silo
from fedmeki_core.channels import channel_options
from fedmeki_core.client import FedmekiClient
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.proto.v1 import silo_pb2, silo_pb2_grpc
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, iter_file_chunks

TASK = "synthetic-vitals"


def write_model(path: Path, mib: int, value: float, tensors: int = 32) -> None:
    per_tensor = mib * (1 << 20) // 4 // tensors
    save_file({f"layer{i:03d}.weight": np.full(per_tensor, value, dtype=np.float32) for i in range(tensors)}, str(path))


def upload(address: str, credential: str, job_id: str, path: Path, chunk_bytes: int) -> float:
    size = path.stat().st_size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()

    def messages() -> Iterator[silo_pb2.UploadUpdateRequest]:
        yield silo_pb2.UploadUpdateRequest(
            header=silo_pb2.UpdateHeader(
                job_id=job_id, round=1, num_samples=100, encoding="safetensors", total_size=size, sha256=digest
            )
        )
        for chunk in iter_file_chunks(path, chunk_bytes=chunk_bytes):
            yield convert.chunk_message(silo_pb2.UploadUpdateRequest, chunk)

    started = time.monotonic()
    with grpc.insecure_channel(address, options=channel_options(chunk_bytes)) as channel:
        silo_pb2_grpc.SiloServiceStub(channel).UploadUpdate(
            messages(), metadata=[("authorization", f"Bearer {credential}")]
        )
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=128, help="delta size in MiB")
    parser.add_argument("--silos", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    args = parser.parse_args()
    with scratch("fedmeki-bench-upload-") as work:
        measure(work, args)


def measure(work: Path, args: argparse.Namespace) -> None:
    data_dir = work / "coordinator"
    # Under /usr/bin/time -v as a second, independent reading of the peak; VmHWM is read from the child itself.
    time_log = work / "time-v.txt"
    wrapper = ["/usr/bin/time", "-v", "-o", str(time_log)] if Path("/usr/bin/time").exists() else []
    server = subprocess.Popen(
        [
            *wrapper,
            sys.executable,
            "-m",
            "coordinator",
            "serve",
            "--address",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    coordinator_pid = server.pid
    try:
        assert server.stdout is not None
        port = re.search(r"127\.0\.0\.1:(\d+)", server.stdout.readline())
        assert port, "coordinator did not start"
        if wrapper:  # the coordinator is the child of /usr/bin/time
            coordinator_pid = int(Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()[0])
        address = f"127.0.0.1:{port.group(1)}"
        credentials = []
        for index in range(args.silos):
            token = add_silo(f"silo-{index}", "--data-dir", str(data_dir))
            with grpc.insecure_channel(address) as channel:
                stub = silo_pb2_grpc.SiloServiceStub(channel)
                credential = stub.Enroll(silo_pb2.EnrollRequest(token=token)).credential
                stub.NextTask(
                    silo_pb2.NextTaskRequest(tasks=[TASK]), metadata=[("authorization", f"Bearer {credential}")]
                )
            credentials.append(credential)
        time.sleep(1.0)
        idle_kib = memory_kib(coordinator_pid, "VmRSS")
        initial, delta = work / "initial.safetensors", work / "delta.safetensors"
        write_model(initial, args.mib, 1.0)
        write_model(delta, args.mib, 0.5)
        spec = parse_job_spec({"name": "memory", "task": TASK, "rounds": 1, "min_silos": args.silos})
        with FedmekiClient(address) as client:
            job = client.submit_job(
                spec, initial, check_model=False
            )  # synthetic tensors: the platform moves them by name and shape
            while not client.get_job(job.id).rounds or not client.get_job(job.id).rounds[0].selected_silos:
                time.sleep(0.05)
            after_submit_kib = memory_kib(coordinator_pid, "VmHWM")
            durations: list[float] = []
            threads = [
                threading.Thread(
                    target=lambda c=c: durations.append(upload(address, c, job.id, delta, args.chunk_bytes))
                )
                for c in credentials
            ]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            uploads_s = time.monotonic() - started
            while client.get_job(job.id).current_round < 1:
                time.sleep(0.05)
            round_s = time.monotonic() - started
        peak_kib = memory_kib(coordinator_pid, "VmHWM")
        delta_bytes = delta.stat().st_size
        print(f"delta {delta_bytes / 2**20:.1f} MiB x {args.silos} silos uploading at once")
        print(
            f"coordinator RSS idle {idle_kib / 1024:.1f} MiB, peak {peak_kib / 1024:.1f} MiB "
            f"(peak after submission, before uploads: {after_submit_kib / 1024:.1f} MiB)"
        )
        print(
            f"peak above idle {(peak_kib - idle_kib) / 1024:.1f} MiB = "
            f"{(peak_kib - idle_kib) * 1024 / delta_bytes:.2f}x one delta; uploads {uploads_s:.2f}s, "
            f"round committed after {round_s:.2f}s"
        )
        print(
            json.dumps(
                {
                    "delta_bytes": delta_bytes,
                    "silos": args.silos,
                    "idle_rss_bytes": idle_kib * 1024,
                    "peak_rss_bytes": peak_kib * 1024,
                    "peak_above_idle_bytes": (peak_kib - idle_kib) * 1024,
                    "uploads_s": round(uploads_s, 3),
                    "round_s": round(round_s, 3),
                }
            )
        )
    finally:
        if wrapper:
            subprocess.run(["kill", "-TERM", str(coordinator_pid)], check=False)
        else:
            server.terminate()
        server.wait(timeout=30)
    if time_log.exists():
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_log.read_text())
        if peak:
            print(f"/usr/bin/time -v: maximum resident set size {int(peak.group(1)) / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
