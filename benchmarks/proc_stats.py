"""A process's threads, open file descriptors and CPU time as /proc reports them, and their peaks over a run."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from types import TracebackType


def threads(pid: int) -> int:
    match = re.search(r"^Threads:\s+(\d+)$", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no Threads in /proc/{pid}/status")
    return int(match.group(1))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_sockets(pid: int) -> int:
    """The descriptors that are sockets: the listening ones and every connection."""
    folder = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in os.listdir(folder):
        try:
            count += os.readlink(folder / fd).startswith("socket:")
        except FileNotFoundError:  # closed since the listing
            continue
    return count


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of every thread of the process so far."""
    # Fields after the command name (which may hold spaces, hence the split at its closing parenthesis).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PeakWatch:
    """Samples a process's threads and open descriptors every `interval` seconds while in its `with` block."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.peak_threads = threads(pid)
        self.peak_fds = open_fds(pid)

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.peak_threads = max(self.peak_threads, threads(self._pid))
                self.peak_fds = max(self.peak_fds, open_fds(self._pid))
            except (FileNotFoundError, ProcessLookupError):  # it ended: the run reports why
                return

    def __enter__(self) -> PeakWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
