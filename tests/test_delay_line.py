"""The benchmarks' WAN link (benchmarks/delay_line.py) carries bytes intact, late by its delay, no faster than its rate.

Correctness only: each bound is one the link must respect however loaded the machine (a slow machine makes
transfers slower, never faster), so no test here depends on the machine's speed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from benchmarks.delay_line import PROFILES, Link, Profile, count_receiver, running, transfer


def _echo_target() -> tuple[socket.socket, str]:
    """A TCP server that sends back what it gets, one connection at a time."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(1 << 16):
                    connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def _exchange(port: int, payload: bytes) -> bytes:
    """Send `payload` through the link to the echo server; what came back."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while data := sock.recv(1 << 16):
            received += data
        sender.join()
    return bytes(received)


def test_bytes_arrive_intact_both_ways_on_every_profile() -> None:
    payload = os.urandom(3 << 20)
    server, target = _echo_target()
    with server:
        for profile in PROFILES.values():
            fast = Profile(profile.name, 0.002, profile.down_bps * 4, profile.up_bps * 4, profile.shared)
            with running(fast, target, listeners=2) as line:
                echoed = _exchange(line.ports[1], payload)
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
                assert line.counters[1].up == line.counters[1].down == len(payload)
                assert line.counters[0].up == 0


def test_a_round_trip_takes_at_least_the_links_rtt() -> None:
    server, target = _echo_target()
    with server, running(Profile("slow-rtt", 0.2, 100e6, 100e6), target) as line:
        started = time.monotonic()
        assert _exchange(line.ports[0], b"ping") == b"ping"
        assert time.monotonic() - started >= 0.2


def test_a_transfer_is_no_faster_than_the_rate_and_a_window_binds_at_window_per_rtt() -> None:
    profile = Profile("narrow", 0.05, 16e6, 16e6)  # 2 MB/s
    with count_receiver() as target, running(profile, target) as line:
        assert transfer(line.ports[0], 1_000_000, None) >= 1_000_000 * 8 / 16e6
        # 16 KiB unacknowledged at most: 20 windows of 16 KiB need 20 round trips
        assert transfer(line.ports[0], 20 * 16384, 16384) >= 19 * 0.05


def test_the_slower_direction_of_an_asymmetric_link_is_the_one_capped() -> None:
    link = Link(8e6, 0.01)  # 1 MB/s, then the delay
    assert link.release_time(1_000_000, 0.0) == pytest.approx(1.01)
    assert link.release_time(500_000, 0.2) == pytest.approx(1.51)  # queued behind the first megabyte
    assert link.release_time(1000, 5.0) == pytest.approx(5.011)  # an idle link starts at once
    asymmetric = PROFILES["40ms-200M-down-40M-up"]
    assert asymmetric.up_bps < asymmetric.down_bps


def test_a_shared_profile_queues_every_listener_on_one_link() -> None:
    profile = Profile("shared-narrow", 0.002, 16e6, 16e6, shared=True)  # 2 MB/s for all
    with count_receiver() as target, running(profile, target, listeners=2) as line:
        durations: list[float] = []
        threads = [
            threading.Thread(target=lambda p=p: durations.append(transfer(p, 1_000_000, None))) for p in line.ports
        ]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() - started >= 2_000_000 * 8 / 16e6  # both megabytes through one 2 MB/s link


def test_a_dropping_link_cuts_the_connection_after_its_bytes() -> None:
    server, target = _echo_target()
    with server, running(Profile("lossy", 0.002, 100e6, 100e6), target, drop_after=100_000) as line:
        with socket.create_connection(("127.0.0.1", line.ports[0])) as sock, pytest.raises(OSError):
            for _ in range(200):
                sock.sendall(bytes(10_000))
                time.sleep(0.001)
        assert line.counters[0].up == 100_000 and line.counters[0].dropped == 1
