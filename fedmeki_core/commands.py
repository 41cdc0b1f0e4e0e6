"""What every fedmeki command line shares: logging set-up, and one clear line instead of a traceback."""

from __future__ import annotations

import argparse
import sys

from fedmeki_core.errors import FedmekiError
from fedmeki_core.logs import FORMAT_ENV, FORMATS, configure_logging


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, configure logging, run the chosen handler; a FedmekiError exits 2 with its message."""
    args = parser.parse_args(argv)
    if args.log_format not in FORMATS:  # from the environment: argparse checks only what is typed
        parser.error(f"{FORMAT_ENV}={args.log_format!r}: choose from {', '.join(FORMATS)}")
    configure_logging(args.log_level, args.log_format)
    try:
        return int(args.handler(args))
    except FedmekiError as exc:
        print(f"{parser.prog}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
