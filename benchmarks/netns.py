"""Network namespaces for the WAN benchmark: a silo whose only way out is its own delay line.

A proxy in front of the coordinator proves nothing if the silo can reach the coordinator by another route (a
SuperNode was seen to register through its proxy and then move its arrays over loopback). Here each silo runs in a
`Namespace` of its own, made by `unshare --net`: it holds only a loopback interface, brought up inside it. The
silo's delay line binds its listener inside that namespace (`listen_in`) and dials the coordinator from the root
namespace, so 127.0.0.1:PORT of its delay line is the only address a process in the namespace can reach outside
itself: the coordinator's own port, seen from inside, refuses (`Namespace.reaches`). Needs root (CAP_SYS_ADMIN):
`refusal()` says why when namespaces cannot be made.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000  # <sched.h>; os.setns only arrives in Python 3.12
_T = TypeVar("_T")


def refusal() -> str | None:
    """Why this machine cannot run a silo in its own network namespace (None: it can)."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux, iproute2)"
    tried = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True, check=False)
    if tried.returncode != 0:
        return f"`unshare --net` is not permitted here ({tried.stderr.strip()}): it needs root or CAP_SYS_ADMIN"
    return None


def _inside(path: str, work: Callable[[], _T]) -> _T:
    """`work()` run in the network namespace at `path`, on a thread of its own: setns(2) moves only the calling
    thread, and the thread ends with the call, so no other thread of this process ever leaves its namespace."""
    outcome: list[_T] = []
    failure: list[BaseException] = []

    def enter_and_work() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"setns({path}): {os.strerror(error)}")
            finally:
                os.close(fd)
            outcome.append(work())
        except BaseException as error:  # handed to the caller's thread
            failure.append(error)

    thread = threading.Thread(target=enter_and_work, name="netns")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def listen_in(path: str) -> socket.socket:
    """A listening TCP socket on 127.0.0.1 (a free port) inside the network namespace at `path`."""
    return _inside(path, lambda: socket.create_server(("127.0.0.1", 0)))


class Namespace:
    """A network namespace with only loopback, held open by a sleeping process until `close`."""

    def __init__(self) -> None:
        # The holder brings loopback up from inside, says so, then sleeps: its namespace lives while it does.
        self._holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._holder.stdout is not None
        if self._holder.stdout.readline().strip() != "up":
            self.close()
            raise RuntimeError(f"could not make a network namespace: {refusal() or 'unshare exited'}")
        self.path = f"/proc/{self._holder.pid}/ns/net"

    def prefix(self) -> list[str]:
        """What runs a command inside the namespace, put before it."""
        return ["nsenter", f"--net={self.path}", "--"]

    def reaches(self, port: int, host: str = "127.0.0.1") -> bool:
        """Whether a TCP connection from inside the namespace to host:port is accepted."""

        def attempt() -> bool:
            with socket.socket() as sock:
                sock.settimeout(2.0)
                return sock.connect_ex((host, port)) == 0

        return _inside(self.path, attempt)

    def close(self) -> None:
        if self._holder.poll() is None:
            self._holder.terminate()
        self._holder.wait()
        if self._holder.stdout is not None:
            self._holder.stdout.close()
