"""gRPC's C-core logs (`I1206 ... Handshake failed`) kept off stderr, where they broke JSON logs and the CLI's output.

C-core reads `GRPC_VERBOSITY` once, when grpc is first imported, so each command's entry point (the packages'
`__main__` modules) calls `quiet_grpc_core` before it imports anything that imports grpc. An operator who sets
`GRPC_VERBOSITY` (or `GRPC_TRACE`, to debug the transport) keeps their setting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

FORMAT_ENV = "FEDMEKI_LOG_FORMAT"  # the same variable as fedmeki_core.logs, which this module must not import


def json_logs(argv: Sequence[str]) -> bool:
    """Does this command line ask for JSON logs (flag, anywhere on the line, or environment)?"""
    for index, arg in enumerate(argv):
        if arg == "--log-format" and index + 1 < len(argv):
            return argv[index + 1] == "json"
        if arg.startswith("--log-format="):
            return arg.partition("=")[2] == "json"
    return os.environ.get(FORMAT_ENV) == "json"


def quiet_grpc_core(argv: Sequence[str], *, silent: bool) -> None:
    """Set C-core's verbosity before grpc loads: none with JSON logs or where `silent` (a person's command line),
    else errors only (their lines then stand out in a text log)."""
    if "GRPC_VERBOSITY" in os.environ or "GRPC_TRACE" in os.environ:
        return
    os.environ["GRPC_VERBOSITY"] = "NONE" if silent or json_logs(argv) else "ERROR"
