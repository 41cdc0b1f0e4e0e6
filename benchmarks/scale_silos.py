"""Many benchmark silos in one process, for `fedmeki bench scale`: each a thread with its own channel (and TCP
connection), its own enrollment token and credential, training "global + constant" (benchmarks/bench_silo.py).

    python -m benchmarks.scale_silos --coordinator ADDRESS --tokens FILE --work-dir DIR --rounds R

FILE is a JSON object {silo index: enrollment token}. Prints "ready" once every silo has enrolled and declared its
task; each round's timestamps go, one JSON line per silo and round, to DIR/records.jsonl (stdout is a pipe that
nobody reads while the rounds run). A silo that fails writes its error there instead.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_silo import TASK, run_rounds
from fedmeki_core.backoff import Backoff
from fedmeki_core.channels import Keepalive
from fedmeki_core.errors import UnavailableError
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES
from silo_agent.transport import GrpcTransport

# Long enough for the busy refusals (RESOURCE_EXHAUSTED, retry later) of a coordinator at its caps to spread the
# silos out rather than end them.
RETRY_MAX_SECONDS = 900.0


class Records:
    """One JSON line per call, whole, from any thread."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _silo(
    index: int, token: str, args: argparse.Namespace, records: Records, ready: threading.Barrier
) -> GrpcTransport | None:
    # Channels with equal arguments in one process share one connection; a keepalive time of its own (60 s plus
    # `index` ms) gives each silo its own, as separate hospitals have.
    keepalive = Keepalive(60.0 + index / 1000, 20.0)
    try:
        credential = _enroll(GrpcTransport(args.coordinator, keepalive=keepalive), token)
        transport = GrpcTransport(args.coordinator, credential, args.chunk_bytes, RETRY_MAX_SECONDS, None, keepalive)
        transport.next_task([TASK], "cpu", 0)  # declare the task: the silo is now eligible
    except Exception as exc:
        records.write({"silo": index, "error": f"enrolment: {exc}"})
        ready.abort()
        return None
    try:
        ready.wait()
    except threading.BrokenBarrierError:  # another silo of this process failed: it wrote why
        transport.close()
        return None
    return transport


def _enroll(transport: GrpcTransport, token: str) -> str:
    """The silo's credential; hundreds enrolling at once may find the coordinator busy, and wait their turn."""
    backoff = Backoff(initial=0.4, maximum=10.0)
    give_up = time.monotonic() + RETRY_MAX_SECONDS
    try:
        while True:
            try:
                return transport.enroll(token).credential
            except UnavailableError:
                if time.monotonic() > give_up:
                    raise
                time.sleep(backoff.next_delay())
    finally:
        transport.close()


def run_silo(index: int, token: str, args: argparse.Namespace, records: Records, ready: threading.Barrier) -> None:
    transport = _silo(index, token, args, records, ready)
    if transport is None:
        return
    work = args.work_dir / f"silo-{index}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_rounds(transport, work, args.rounds, lambda record: records.write({"silo": index, **record}))
    except Exception as exc:
        records.write({"silo": index, "error": str(exc)})
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--tokens", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES)
    args = parser.parse_args()
    tokens = {int(index): token for index, token in json.loads(args.tokens.read_text()).items()}
    records = Records(args.work_dir / "records.jsonl")
    # The last silo to be ready says so for all of them.
    ready = threading.Barrier(len(tokens), action=lambda: print(json.dumps({"ready": time.time()}), flush=True))
    threads = [
        threading.Thread(target=run_silo, args=(index, token, args, records, ready), daemon=True)
        for index, token in tokens.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    records.close()


if __name__ == "__main__":
    main()
