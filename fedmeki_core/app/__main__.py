"""`python -m fedmeki_core` and the fedmeki command: gRPC's C-core silenced, then the command line."""

import sys

from fedmeki_core.grpc_logs import quiet_grpc_core


def main() -> int:
    quiet_grpc_core(sys.argv[1:], silent=True)
    from fedmeki_core.app.cli import main as command_line  # after quiet_grpc_core: grpc reads it when first imported

    return command_line()


if __name__ == "__main__":
    sys.exit(main())
