"""Every gRPC server and channel fedmeki opens carries the HTTP/2 window options that fill a WAN link.

Two halves: the source holds no other place that opens a channel or a server than the ones exercised here, and
those, run for real (a coordinator with its health port, the SDK, the agent's transport, the health check, a
channel with a kit), are seen at the grpc library's edge to pass the options of `transport_options`.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from coordinator.healthcheck import check
from coordinator.server import Coordinator
from fedmeki_core.app.provision import provision
from fedmeki_core.channels import open_channel
from fedmeki_core.client import FedmekiClient
from fedmeki_core.kits import load_kit
from fedmeki_core.transport_options import STREAM_WINDOW_BYTES, channel_window_options, server_window_options
from silo_agent.transport import GrpcTransport
from tests.conftest import address, coordinator_settings, serving

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedmeki_core", "coordinator", "silo_agent")
OPENERS = {"insecure_channel", "secure_channel", "server"}
# Where the source opens a channel or a server: each is exercised by the test below.
EXPECTED = {
    ("fedmeki_core/channels.py", "open_channel", "insecure_channel"),
    ("fedmeki_core/channels.py", "open_channel", "secure_channel"),
    ("coordinator/server.py", "_bound_server", "server"),
    ("coordinator/server.py", "_health_only", "server"),
}


def _openers(path: Path) -> Iterator[tuple[str, str]]:
    """(enclosing function, grpc function) for each `grpc.X(...)` or `grpc.aio.X(...)` call that opens a channel or
    a server."""
    tree = ast.parse(path.read_text())
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and ast.unparse(node.func.value) in {"grpc", "aio", "grpc.aio"}
                and node.func.attr in OPENERS
            ):
                yield function.name, node.func.attr


def test_channels_and_servers_are_opened_in_the_known_places_only() -> None:
    found = {
        (str(path.relative_to(ROOT)), function, opener)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "proto" not in path.parts
        for function, opener in _openers(path)
    }
    assert found == EXPECTED


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, int]]]:
    """Each channel and server grpc opens from now on, with its options (the real ones are still opened)."""
    seen: list[tuple[str, dict[str, int]]] = []

    def recording(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, dict(kwargs.get("options") or ())))
            return real(*args, **kwargs)

        return wrapper

    for name in OPENERS:
        monkeypatch.setattr(grpc, name, recording(name, getattr(grpc, name)))
    monkeypatch.setattr(grpc.aio, "server", recording("server", grpc.aio.server))  # the coordinator's servers
    return seen


def _has(options: dict[str, int], expected: list[tuple[str, int]]) -> bool:
    return all(options.get(key) == value for key, value in expected)


def test_every_channel_and_server_carries_the_window_options(
    tmp_path: Path, opened: list[tuple[str, dict[str, int]]]
) -> None:
    window = 3 << 20  # the coordinator's setting reaches both of its servers
    settings = coordinator_settings(tmp_path / "c", health_address="127.0.0.1:0", stream_window_bytes=window)
    for coordinator in serving(Coordinator(settings)):
        target = address(coordinator)
        with FedmekiClient(target) as client:
            client.list_jobs()
        GrpcTransport(target).close()
        assert check(f"127.0.0.1:{coordinator.health_port}", "", 5.0) is None
        provision(tmp_path / "kits", "127.0.0.1", silos=["a"])
        open_channel(target, load_kit(tmp_path / "kits" / "a")).close()
    servers = [options for name, options in opened if name == "server"]
    channels = [options for name, options in opened if name != "server"]
    assert {name for name, _ in opened} == OPENERS
    assert len(servers) == 2 and len(channels) == 4
    assert all(_has(options, server_window_options(window)) for options in servers)
    assert all(_has(options, channel_window_options()) for options in channels)


def test_the_windows_are_large_enough_for_a_wan_link() -> None:
    """2x the bandwidth-delay product of 200 Mbit/s at 40 ms, the link the benchmarks call typical."""
    assert STREAM_WINDOW_BYTES >= 2 * 200e6 / 8 * 0.040
    assert ("grpc.http2.bdp_probe", 0) in server_window_options()
    assert ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES) in server_window_options()
    assert ("grpc.http2.bdp_probe", 1) in channel_window_options()
