"""A process's memory as the kernel reports it (`/proc/PID/status`), for the benchmarks' RSS figures."""

from __future__ import annotations

import re
from pathlib import Path


def memory_kib(pid: int, field: str) -> int:
    """`field` of the process's status in KiB: `VmRSS` now, `VmHWM` its high-water mark."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/{pid}/status")
    return int(match.group(1))
