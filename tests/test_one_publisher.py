"""Every job event (rounds, updates, upload progress, job status) leaves through one publisher,
`coordinator/publisher.py`: no other module of the coordinator publishes on the event bus."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_only_the_publisher_publishes_events() -> None:
    publishing = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "coordinator").rglob("*.py")
        if re.search(r"\.publish\(", path.read_text())
    ]
    assert publishing == ["coordinator/publisher.py"]
