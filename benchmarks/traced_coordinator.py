"""The coordinator under tracemalloc, for `fedmeki bench scale --trace-memory`: where its memory above idle goes.

Run as `python -m benchmarks.traced_coordinator serve ...` (the coordinator's own arguments). SIGUSR1 marks idle (a
snapshot); a thread then keeps a snapshot each time the traced memory passes its highest so far by 5%; at exit the
growth from idle to the highest, by source line and by file, and the traced and resident totals at both, are
written as JSON to $FEDMEKI_TRACE_OUT. What Python allocates is traced; the rest of the resident memory above idle
is gRPC's C core (its buffers), the allocator's arenas, and pages not given back.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

from benchmarks.memory import memory_kib
from coordinator.__main__ import main

_GROWTH = 1.05  # a new peak snapshot when the traced memory passes the last one's by this much
_TOP = 25


class _Tracer:
    def __init__(self, out: Path) -> None:
        self._out = out
        self._idle_asked = threading.Event()
        self._idle: tuple[tracemalloc.Snapshot, int, int] | None = None  # snapshot, traced bytes, RSS KiB
        self._peak: tuple[tracemalloc.Snapshot, int, int] | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        tracemalloc.start()
        signal.signal(signal.SIGUSR1, lambda *_: self._idle_asked.set())
        threading.Thread(target=self._sample, name="memory-tracer", daemon=True).start()
        atexit.register(self.write)

    def _now(self) -> tuple[tracemalloc.Snapshot, int, int]:
        return tracemalloc.take_snapshot(), tracemalloc.get_traced_memory()[0], memory_kib(os.getpid(), "VmRSS")

    def _sample(self) -> None:
        self._idle_asked.wait()
        self._idle = self._peak = self._now()
        while not self._stop.wait(0.5):
            if tracemalloc.get_traced_memory()[0] > self._peak[1] * _GROWTH:
                self._peak = self._now()

    def write(self) -> None:
        self._stop.set()
        if self._idle is None or self._peak is None:
            return
        (idle, idle_traced, idle_rss), (peak, peak_traced, peak_rss) = self._idle, self._peak
        report: dict[str, Any] = {
            "traced_idle_mib": idle_traced / 2**20,
            "traced_peak_above_idle_mib": (peak_traced - idle_traced) / 2**20,
            "rss_at_traced_peak_above_idle_mib": (peak_rss - idle_rss) / 1024,
            "rss_hwm_above_idle_mib": (memory_kib(os.getpid(), "VmHWM") - idle_rss) / 1024,
        }
        for key in ("lineno", "filename"):
            report[f"by_{key}"] = [
                {"where": str(stat.traceback[0]), "mib": stat.size_diff / 2**20, "blocks": stat.count_diff}
                for stat in peak.compare_to(idle, key)[:_TOP]
            ]
        self._out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    _Tracer(Path(os.environ["FEDMEKI_TRACE_OUT"])).start()
    sys.exit(main())
