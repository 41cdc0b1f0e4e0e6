"""A user-space WAN link: a TCP proxy that delays each direction by a propagation time and a capped serialisation rate.

    python -m benchmarks.delay_line serve --profile 40ms-200M --target 127.0.0.1:PORT --listeners 2
    python -m benchmarks.delay_line check --profile 40ms-200M      # raw TCP through it: rate, and window / RTT

Kernel netem is not available here, so each direction of a link is a `Link`: bytes that arrive at time t start
serialising when the link is free (at `rate` bits per second) and leave `delay` (half the round trip) after their
last bit went out. The proxy reads greedily into a large bounded buffer, so the bytes in flight are limited only by
the sender's own window (TCP's, HTTP/2's), as on a real link. A shared profile gives every listener the same two
`Link`s: the silos then share one coordinator uplink. `drop_after` cuts a connection once that many bytes went
towards the target (a link that fails mid-upload). With `namespaces` (one network namespace path a listener, see
`benchmarks.netns`) each listener binds inside its namespace while the line dials the target from its own: the
silo in that namespace has no other way out. `serve` prints one JSON line of its ports, then, when stopped
(SIGTERM or end of input), one JSON line of the bytes each listener carried each way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from benchmarks.netns import listen_in

MAX_BUFFER_BYTES = 64 << 20  # per direction of a connection: far above any window a sender here opens


@dataclass(frozen=True)
class Profile:
    """A link: its round-trip time and its rate each way (down: towards the silo, up: towards the coordinator)."""

    name: str
    rtt_s: float
    down_bps: float
    up_bps: float
    shared: bool = False  # every listener shares one link (one coordinator uplink for all silos)


PROFILES = {
    p.name: p
    for p in (
        Profile("10ms-400M", 0.010, 400e6, 400e6),
        Profile("40ms-200M", 0.040, 200e6, 200e6),
        Profile("100ms-50M", 0.100, 50e6, 50e6),
        Profile("40ms-200M-down-40M-up", 0.040, 200e6, 40e6),
        Profile("shared-40ms-200M", 0.040, 200e6, 200e6, shared=True),
    )
}


class Link:
    """One direction of a link: when bytes that arrive now leave it (serialisation behind earlier bytes + delay)."""

    def __init__(self, rate_bps: float, delay_s: float) -> None:
        self.rate_bytes = rate_bps / 8
        self.delay_s = delay_s
        self._free_at = 0.0

    def release_time(self, nbytes: int, now: float) -> float:
        self._free_at = max(self._free_at, now) + nbytes / self.rate_bytes
        return self._free_at + self.delay_s

    def read_size(self) -> int:
        """About 2 ms of the link's bytes per read: store-and-forward of one read adds at most that."""
        return int(min(64 << 10, max(4 << 10, self.rate_bytes * 0.002)))


@dataclass
class Counters:
    """The bytes one listener carried, towards the target (up) and back (down), over all its connections."""

    up: int = 0
    down: int = 0
    connections: int = 0
    dropped: int = 0


@dataclass
class _Direction:
    link: Link
    queue: asyncio.Queue[tuple[float, bytes]] = field(default_factory=asyncio.Queue)
    queued: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    link: Link,
    count: Counters,
    up: bool,
    drop_after: int | None,
    cut: asyncio.Event,
) -> None:
    """Carry one direction of one connection: read greedily, release each piece at its time, in order."""
    loop = asyncio.get_running_loop()
    direction = _Direction(link)
    direction.room.set()
    sent = 0

    async def release() -> None:
        while True:
            at, data = await direction.queue.get()
            if not data:
                break
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            direction.queued -= len(data)
            if direction.queued < MAX_BUFFER_BYTES:
                direction.room.set()
            await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()

    releaser = asyncio.create_task(release())
    try:
        while not cut.is_set():
            await direction.room.wait()
            size = link.read_size()
            if drop_after is not None and up:
                size = min(size, drop_after - sent)
            data = await reader.read(size)
            if not data:
                break
            sent += len(data)
            if up:
                count.up += len(data)
            else:
                count.down += len(data)
            direction.queued += len(data)
            if direction.queued >= MAX_BUFFER_BYTES:
                direction.room.clear()
            direction.queue.put_nowait((link.release_time(len(data), loop.time()), data))
            if drop_after is not None and up and sent >= drop_after:
                count.dropped += 1
                cut.set()
        direction.queue.put_nowait((0.0, b""))
        await releaser
    finally:
        if cut.is_set() or not releaser.done():
            releaser.cancel()
            await asyncio.gather(releaser, return_exceptions=True)
        if cut.is_set():
            writer.transport.abort()


class DelayLine:
    """Listeners on 127.0.0.1 that forward to `target` through a profile's links (an asyncio server)."""

    def __init__(
        self,
        profile: Profile,
        target: str,
        listeners: int,
        drop_after: int | None = None,
        namespaces: Sequence[str] = (),
    ) -> None:
        if namespaces and len(namespaces) != listeners:
            raise ValueError(f"{len(namespaces)} namespaces for {listeners} listeners: one each")
        self.namespaces = list(namespaces)
        self.profile = profile
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.listeners = listeners
        self.drop_after = drop_after
        self.counters = [Counters() for _ in range(listeners)]
        self.ports: list[int] = []
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()

    def _links(self) -> tuple[Link, Link]:
        half = self.profile.rtt_s / 2
        return Link(self.profile.up_bps, half), Link(self.profile.down_bps, half)

    async def start(self) -> list[int]:
        shared = self._links() if self.profile.shared else None
        for index in range(self.listeners):
            up, down = shared or self._links()  # one link per listener, its connections queue on it
            sock = listen_in(self.namespaces[index]) if self.namespaces else socket.create_server(("127.0.0.1", 0))
            server = await asyncio.start_server(
                functools.partial(self._connect, count=self.counters[index], up=up, down=down), sock=sock
            )
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        return self.ports

    async def _connect(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, count: Counters, up: Link, down: Link
    ) -> None:
        count.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)
        try:
            server_r, server_w = await asyncio.open_connection(self.host, self.port)
        except OSError:
            client_w.transport.abort()
            return
        cut = asyncio.Event()
        try:
            await asyncio.gather(
                _pump(client_r, server_w, up, count, True, self.drop_after, cut),
                _pump(server_r, client_w, down, count, False, None, cut),
                return_exceptions=True,
            )
        except asyncio.CancelledError:  # the line stops
            cut.set()
        for w in (client_w, server_w):
            w.transport.abort() if cut.is_set() else w.close()

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)


@contextlib.contextmanager
def running(
    profile: Profile,
    target: str,
    listeners: int = 1,
    drop_after: int | None = None,
    namespaces: Sequence[str] = (),
) -> Iterator[DelayLine]:
    """A DelayLine on its own event loop in a background thread, for the length of the block."""
    line = DelayLine(profile, target, listeners, drop_after, namespaces)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="delay-line", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(line.start(), loop).result(timeout=10)
        yield line
    finally:
        asyncio.run_coroutine_threadsafe(line.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


async def _serve(line: DelayLine) -> None:
    ports = await line.start()
    print(json.dumps({"ports": ports, "profile": line.profile.name}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.readline() else None)
    await stop.wait()
    await line.stop()
    print(json.dumps({"carried": [vars(c) for c in line.counters]}), flush=True)


def transfer(port: int, size: int, window: int | None) -> float:
    """Seconds to send `size` bytes through the proxy at 127.0.0.1:`port` to an echo-the-count receiver (see
    `count_receiver`), keeping at most `window` bytes unacknowledged (None: as many as TCP lets through)."""
    import socket

    block = bytes(64 << 10)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.monotonic()
        sent = acked = 0
        while sent < size:
            allowed = size - sent if window is None else min(size - sent, window - (sent - acked))
            if allowed > 0:
                sent += sock.send(block[: min(allowed, len(block))])
                continue
            acked = _read_ack(sock, acked)
        while acked < size:
            acked = _read_ack(sock, acked)
        return time.monotonic() - started


def _read_ack(sock: object, acked: int) -> int:
    import socket

    assert isinstance(sock, socket.socket)
    data = sock.recv(4096)
    if not data:
        raise ConnectionError("the receiver closed the connection")
    return max(acked, *(int(v) for v in data.split() if v))


@contextlib.contextmanager
def count_receiver() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that reads what arrives and answers each read with the total so far (an ack)."""
    import socket
    import socketserver

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            total = 0
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := self.request.recv(1 << 20):
                total += len(data)
                self.request.sendall(f"{total} ".encode())

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


def check(profile: Profile, size: int) -> None:
    """Raw TCP through the link: an unbounded sender reaches the up rate; a small window binds at window / RTT."""
    with count_receiver() as target, running(profile, target) as line:
        for window in (None, 64 << 10, 256 << 10):
            seconds = transfer(line.ports[0], size, window)
            bound = size * 8 / profile.up_bps + profile.rtt_s
            if window is not None:  # acks slide the window: at most one window per round trip
                bound = max(bound, size / window * profile.rtt_s)
            print(
                json.dumps(
                    {
                        "profile": profile.name,
                        "window": window,
                        "bytes": size,
                        "seconds": round(seconds, 3),
                        "mbit_s": round(size * 8 / seconds / 1e6, 1),
                        "bound_s": round(bound, 3),
                        "ratio": round(seconds / bound, 2),
                    }
                ),
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["serve", "check"])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="40ms-200M")
    parser.add_argument("--target", help="host:port to forward to (serve)")
    parser.add_argument("--listeners", type=int, default=1)
    parser.add_argument("--drop-after", type=int, help="cut each connection after this many bytes towards the target")
    parser.add_argument(
        "--netns", action="append", default=[], help="a network namespace path per listener, to listen inside it"
    )
    parser.add_argument("--bytes", type=int, default=32 << 20, help="size of the check's transfers")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.mode == "check":
        check(profile, args.bytes)
    else:
        if not args.target:
            parser.error("serve needs --target")
        asyncio.run(_serve(DelayLine(profile, args.target, args.listeners, args.drop_after, args.netns)))


if __name__ == "__main__":
    main()
