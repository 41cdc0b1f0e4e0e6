"""What every fedmeki command line shares: logging set-up, and one clear line instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import sys

from fedmeki_core.errors import FedmekiError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, configure logging, run the chosen handler; a FedmekiError exits 2 with its message."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    try:
        return int(args.handler(args))
    except FedmekiError as exc:
        print(f"{parser.prog}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
