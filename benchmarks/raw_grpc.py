"""The raw-gRPC bound: the same bytes, the same chunk size, through a minimal grpcio stream, no fedmeki code.

python -m benchmarks.raw_grpc serve                       # prints "port N"
python -m benchmarks.raw_grpc upload|download ADDRESS BYTES CHUNK START_AT   # its timestamps, as JSON
python -m benchmarks.raw_grpc many upload|download ADDRESS BYTES CHUNK START_AT COUNT  # COUNT transfers at once
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

_UPLOAD = "/bench.Raw/Upload"
_DOWNLOAD = "/bench.Raw/Download"
_LIMIT = 64 << 20


def _identity(data: bytes) -> bytes:
    return data


def _upload(chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    total = 0
    for chunk in chunks:
        total += len(chunk)
    return str(total).encode()


def _download(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    size, chunk = (int(v) for v in request.decode().split(","))
    block = b"\x01" * chunk
    sent = 0
    while sent < size:
        piece = block if size - sent >= chunk else block[: size - sent]
        sent += len(piece)
        yield piece


def serve() -> None:
    options = [("grpc.max_receive_message_length", _LIMIT), ("grpc.max_send_message_length", _LIMIT)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=options)
    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(_upload, _identity, _identity),
        "Download": grpc.unary_stream_rpc_method_handler(_download, _identity, _identity),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    server.wait_for_termination()


def client(mode: str, address: str, size: int, chunk: int, start_at: float, index: int = 0) -> None:
    """One transfer, started at `start_at` (wall clock) so that concurrent clients really overlap."""
    options = [
        ("grpc.max_receive_message_length", _LIMIT),
        ("grpc.max_send_message_length", _LIMIT),
        # Channels with equal arguments in one process share one connection; a client per connection, as the
        # silos of `bench scale` have (benchmarks/scale_silos.py).
        ("fedmeki.bench.client", index),
    ]
    with grpc.insecure_channel(address, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        block = b"\x02" * chunk
        time.sleep(max(0.0, start_at - time.time()))
        started = time.time()
        if mode == "upload":

            def chunks() -> Iterator[bytes]:
                sent = 0
                while sent < size:
                    piece = block if size - sent >= chunk else block[: size - sent]
                    sent += len(piece)
                    yield piece

            channel.stream_unary(_UPLOAD, _identity, _identity)(chunks())
        else:
            received = sum(
                len(c) for c in channel.unary_stream(_DOWNLOAD, _identity, _identity)(f"{size},{chunk}".encode())
            )
            assert received == size
        # One write per line: the threads of `many` share stdout.
        sys.stdout.write(json.dumps({"mode": mode, "start": started, "end": time.time()}) + "\n")
        sys.stdout.flush()


def many(mode: str, address: str, size: int, chunk: int, start_at: float, count: int) -> None:
    """`count` transfers at once from this process, each a thread with its own channel (and connection); then a
    line with the process's CPU seconds from `start_at` on (the transfers', not the start-up's)."""
    threads = [
        threading.Thread(target=client, args=(mode, address, size, chunk, start_at, index)) for index in range(count)
    ]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start_at - time.time()))
    before = time.process_time()
    for thread in threads:
        thread.join()
    sys.stdout.write(json.dumps({"cpu_s": time.process_time() - before}) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "many":
        many(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]))
    else:
        client(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
