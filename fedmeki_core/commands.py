"""What every fedmeki command line shares: logging set-up, and one clear line instead of a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from fedmeki_core.errors import FedmekiError
from fedmeki_core.logs import FORMAT_ENV, FORMATS, configure_logging

GLOBAL_OPTIONS = ("--log-level", "--log-format")


def global_options_first(argv: list[str]) -> list[str]:
    """The line with `--log-level` and `--log-format` moved to the front, where argparse takes them, from wherever
    they were typed (`fedmeki-coordinator serve --log-format json`); nothing after a `--` moves."""
    front: list[str] = []
    rest: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg == "--":
            rest.extend(argv[index:])
            break
        if arg in GLOBAL_OPTIONS and index + 1 < len(argv):
            front.extend(argv[index : index + 2])
            index += 2
            continue
        (front if arg.partition("=")[0] in GLOBAL_OPTIONS else rest).append(arg)
        index += 1
    return front + rest


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, configure logging, run the chosen handler; a FedmekiError exits 2 with its message."""
    args = parser.parse_args(global_options_first(sys.argv[1:] if argv is None else argv))
    if args.log_format not in FORMATS:  # from the environment: argparse checks only what is typed
        parser.error(f"{FORMAT_ENV}={args.log_format!r}: choose from {', '.join(FORMATS)}")
    configure_logging(args.log_level, args.log_format)
    try:
        code = int(args.handler(args))
        sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except FedmekiError as exc:
        print(f"{parser.prog}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `fedmeki job watch ID | head`: the reader left; stop quietly, as `yes | head` does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail again
        return 141
