"""`fedmeki bench` as a user runs it: its own process from the repository root, its JSON figure lines read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench_figures(*arguments: str, timeout: int) -> list[dict[str, object]]:
    """`fedmeki bench ARGUMENTS`'s JSON lines, in order; a failed run shows the tail of its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "fedmeki_core.app.cli", "bench", *arguments],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
