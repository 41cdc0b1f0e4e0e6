"""Log output of the command lines: lines for people, or one JSON object a line for a log collector.

Either way a record holds only what the code put in its message: the code logs counts, shapes, digests and
metrics, never samples or tensors (STYLE.md), and `tests/test_logs.py` checks a real round for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from datetime import UTC, datetime

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
FORMAT_ENV = "FEDMEKI_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """`{"time", "level", "logger", "message", "thread"}`, and `exception` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def add_logging_options(parser: argparse.ArgumentParser, level: str) -> None:
    parser.add_argument("--log-level", default=level, choices=LEVELS)
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=os.environ.get(FORMAT_ENV, "text"),
        help=f"text, or json: one object a line (default: ${FORMAT_ENV}, else text)",
    )


def configure_logging(level: str, log_format: str) -> None:
    """The root handler on stderr, unless one is configured already (as under a test runner)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
