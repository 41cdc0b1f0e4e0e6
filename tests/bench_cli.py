"""`fedmeki bench` as a user runs it: its own process from the repository root, its output read back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_output(*arguments: str, timeout: int) -> str:
    """`fedmeki bench ARGUMENTS`'s stdout; a failed run shows the tail of its stderr. The run is a process group of
    its own, killed whole when it outlives `timeout` or the test ends it: a bench's coordinator and silos are its
    children, and killing the launcher alone left them running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fedmeki_core.app.cli", "bench", *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException as error:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        if isinstance(error, subprocess.TimeoutExpired):
            raise AssertionError(f"`fedmeki bench {arguments[0]}` ran past {timeout} s:\n{stderr[-3000:]}") from None
        raise
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def bench_figures(*arguments: str, timeout: int) -> list[dict[str, object]]:
    """`fedmeki bench ARGUMENTS`'s JSON lines, in order."""
    return [json.loads(line) for line in bench_output(*arguments, timeout=timeout).splitlines() if line.startswith("{")]
