"""HTTP/2 flow-control options that every fedmeki gRPC server and channel is built with (one place, one test).

A stream's receive window bounds what a sender may have in flight: a window W caps a stream at W / RTT, whatever
the link (64 KiB at 40 ms: 1.6 MB/s). The coordinator receives uploads, many at once, and the bytes that arrived
but that no handler read yet sit in its memory, up to a window per stream; so it runs a **fixed** window
(`STREAM_WINDOW_BYTES`, a setting): twice the bandwidth-delay product of a 200 Mbit/s link at 40 ms, and of
400 Mbit/s at 10 ms or 50 Mbit/s at 100 ms. gRPC's BDP probing is off there: with it a window grows to 4 MiB and
more per stream, and 16 uploads of 64 MiB at once took 2.2-3.7x the model above idle; with the fixed 2 MiB window
1.4-2.0x (the 64 KiB window it replaces: 1.4-1.6x), at most one window per upload in flight.
A channel receives one download at a time: it keeps BDP probing on (at least 4 MiB, growing with the link), with
the same fixed window as its starting point. docs/architecture.md, "Windows over a WAN", has the measurements.
"""

from __future__ import annotations

STREAM_WINDOW_BYTES = 2 << 20

GrpcOptions = list[tuple[str, int]]


def server_window_options(window_bytes: int = STREAM_WINDOW_BYTES) -> GrpcOptions:
    """A fixed receive window of `window_bytes` per stream and per connection, without BDP probing."""
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window_bytes)]


def channel_window_options() -> GrpcOptions:
    """A receive window that starts at STREAM_WINDOW_BYTES and grows with the link's bandwidth-delay product."""
    return [("grpc.http2.bdp_probe", 1), ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES)]
