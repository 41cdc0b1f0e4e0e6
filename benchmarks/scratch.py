"""A work folder for one benchmark run, removed when the run ends.

A 100M-parameter round leaves about 8 GB behind (the model, every round's checkpoint, spool files, each silo's
downloads and deltas), so runs must not accumulate. A failed run keeps its logs (only) and says where.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        for path in work.rglob("*"):
            if path.is_file() and path.suffix != ".log":
                path.unlink()
        print(f"the benchmark run failed; its logs are in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)
