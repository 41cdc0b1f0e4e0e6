"""A silo in its own network namespace (benchmarks/netns.py) reaches the coordinator only through its delay line.

Real processes throughout: `unshare --net` namespaces, the delay line as a process, a real coordinator and silo
agents for the round. Skipped, with the reason, where network namespaces cannot be made (not root).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from benchmarks import netns
from benchmarks.delay_line import PROFILES, Profile, running
from benchmarks.wan import run_flower_wan, run_wan

REFUSAL = netns.refusal()
pytestmark = pytest.mark.skipif(REFUSAL is not None, reason=f"no network namespaces here: {REFUSAL}")
FAST = Profile("fast", 0.004, 400e6, 400e6)

# Run inside the namespace: dial the target directly (must fail), then through the line (must echo).
_PROBE = """
import json, socket, sys
target, line = int(sys.argv[1]), int(sys.argv[2])
direct = socket.socket()
direct.settimeout(2)
refused = direct.connect_ex(("127.0.0.1", target))
with socket.create_connection(("127.0.0.1", line), timeout=10) as sock:
    sock.sendall(b"ping")
    sock.shutdown(socket.SHUT_WR)
    echoed = sock.recv(16)
print(json.dumps({"direct": refused, "echoed": echoed.decode()}))
"""


def _echo_once(server: socket.socket) -> None:
    connection, _ = server.accept()
    with connection:
        while data := connection.recv(1 << 16):
            connection.sendall(data)


def test_a_process_in_the_namespace_reaches_the_target_only_through_its_line() -> None:
    namespace = netns.Namespace()
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            target = server.getsockname()[1]
            threading.Thread(target=_echo_once, args=(server,), daemon=True).start()
            with running(FAST, f"127.0.0.1:{target}", namespaces=[namespace.path]) as line:
                probe = subprocess.run(
                    [*namespace.prefix(), sys.executable, "-c", _PROBE, str(target), str(line.ports[0])],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=60,
                )
                assert line.counters[0].up == line.counters[0].down == 4
        seen = json.loads(probe.stdout)
        assert seen["direct"] != 0 and seen["echoed"] == "ping"
        assert not namespace.reaches(target)
        links = subprocess.run([*namespace.prefix(), "ip", "-o", "link"], capture_output=True, text=True, check=True)
        assert [line.split(":")[1].strip() for line in links.stdout.splitlines()] == ["lo"]  # no other way out
    finally:
        namespace.close()


def test_the_benchmark_refuses_with_the_reason_where_namespaces_are_not_permitted() -> None:
    # Root without CAP_SYS_ADMIN (dropped from the bounding set): `unshare --net` fails as it would unprivileged.
    refused = subprocess.run(
        ["setpriv", "--bounding-set=-sys_admin", sys.executable, "-m", "benchmarks.wan", "--netns"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert refused.returncode == 2
    assert "network namespaces are needed for --netns and --vs flower: `unshare --net` is not permitted" in (
        refused.stderr
    )


def test_the_line_refuses_a_namespace_list_that_does_not_match_its_listeners() -> None:
    with pytest.raises(ValueError, match="1 namespaces for 2 listeners"), running(FAST, "127.0.0.1:1", 2, None, ["x"]):
        pass


def test_a_round_with_every_silo_in_its_own_namespace_crosses_each_link() -> None:
    row = run_wan(PROFILES["10ms-400M"], "after", 20_000, 2, 2, 4, 256 << 10, isolate=True)
    assert row["isolated"] is True and len(row["carried"]) == 2
    model = row["model_bytes"]
    for link in row["carried"]:  # 2 deltas up; 2 models and the evaluated one down: all through the link
        assert link["up"] > 2 * model and link["down"] > 3 * model


@pytest.mark.slow  # installs flwr into .venv-flower on first use (a package index is needed); about 2 minutes
def test_flower_supernodes_in_namespaces_move_their_arrays_through_their_links() -> None:
    row = run_flower_wan(PROFILES["10ms-400M"], 20_000, 2, 2, 4)
    # Each link carried at least the model each way each round: no route around it, and no chunk sent once for
    # many (a constant model's identical chunks crossed as 0.23x of its arrays).
    assert row["flower_carried_vs_arrays_min"] >= 1 and len(row["flower_carried"]) == 2
    assert row["flower_round_s"] > 0 and row["flower_ratio"] == row["flower_round_s"] / row["flower_link_bound_s"]
