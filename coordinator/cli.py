"""`fedmeki-coordinator`: serve, and the operator's silo commands (add, list, revoke)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.silos import ROLES, SiloRegistry
from coordinator.store.database import Database
from fedmeki_core.commands import run_command

logger = logging.getLogger("coordinator")


def _settings(args: argparse.Namespace) -> CoordinatorSettings:
    overrides: dict[str, Any] = {"data_dir": args.data_dir, "db": args.db}
    if getattr(args, "address", None):
        overrides["address"] = args.address
    return CoordinatorSettings.load(args.config, **overrides)


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    coordinator = Coordinator(settings)
    port = coordinator.start()
    host = settings.address.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        logger.warning(
            "listening on %s WITHOUT TLS: anyone who can reach it can submit jobs and read models; "
            "use it on a trusted network only",
            settings.address,
        )
    print(f"fedmeki coordinator listening on {host}:{port}", flush=True)
    stopped = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping gracefully", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    coordinator.stop()
    return 0


def _registry(args: argparse.Namespace) -> SiloRegistry:
    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.database_url)
    database.migrate()
    return SiloRegistry(database)


def _silo_add(args: argparse.Namespace) -> int:
    silo, token = _registry(args).add(args.name, args.role)
    print(f"silo {silo.name} registered as {silo.role} (id {silo.id})")
    print(f"enrollment token (shown once): {token}")
    print(f"on the silo: fedmeki-silo enroll --coordinator HOST:PORT --token {token} --work-dir DIR")
    return 0


def _silo_list(args: argparse.Namespace) -> int:
    print(f"{'name':<24} {'role':<9} {'enrolled':<9} {'revoked':<8} {'device':<12} {'tasks':<30} last seen")
    for silo in _registry(args).list():
        seen = silo.last_seen_at.isoformat(timespec="seconds") if silo.last_seen_at else "-"
        print(
            f"{silo.name:<24} {silo.role:<9} {'yes' if silo.enrolled else 'no':<9} "
            f"{'yes' if silo.revoked else 'no':<8} {silo.device or '-':<12} {','.join(silo.tasks) or '-':<30} {seen}"
        )
    return 0


def _silo_revoke(args: argparse.Namespace) -> int:
    silo = _registry(args).revoke(args.name)
    print(f"silo {silo.name} revoked: its credential is refused from now on")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeki-coordinator", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML settings file")
    common.add_argument("--data-dir", type=Path, help="database (SQLite default), checkpoints and spooled updates")
    common.add_argument("--db", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[common], help="run the gRPC coordinator")
    serve.add_argument("--address", help="HOST:PORT to listen on (port 0 picks a free one)")
    serve.set_defaults(handler=_serve)
    silo = commands.add_parser("silo", help="manage hospitals").add_subparsers(dest="silo_command", required=True)
    add = silo.add_parser("add", parents=[common], help="register a silo and print its enrollment token")
    add.add_argument("name")
    add.add_argument(
        "--role",
        default="trainer",
        choices=ROLES,
        help="injector: runs jobs' knowledge-injection stage (default trainer)",
    )
    add.set_defaults(handler=_silo_add)
    silo.add_parser("list", parents=[common], help="list silos").set_defaults(handler=_silo_list)
    revoke = silo.add_parser("revoke", parents=[common], help="refuse a silo's credential from now on")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_silo_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
