"""`fedmeki-coordinator`: serve; the operator's silo, certificate and audit commands (run where the database is)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from coordinator.audit import LOCAL, OK, OPERATOR, AuditLog
from coordinator.certificates import RevocationList
from coordinator.instance import is_loopback
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
from coordinator.silos import ROLES, SiloRegistry
from coordinator.store.database import Database
from fedmeki_core.commands import run_command
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.kits import load_kit, parse_serial, serial_text
from fedmeki_core.logs import add_logging_options

logger = logging.getLogger("coordinator")


def _settings(args: argparse.Namespace) -> CoordinatorSettings:
    overrides: dict[str, Any] = {
        "data_dir": args.data_dir,
        "db": args.db,
        "kit": getattr(args, "kit", None),
        "metrics_address": getattr(args, "metrics_address", None),
        "health_address": getattr(args, "health_address", None),
        "dashboard_address": getattr(args, "dashboard_address", None),
        "insecure_plaintext": getattr(args, "insecure_plaintext", None),
    }
    if getattr(args, "address", None):
        overrides["address"] = args.address
    return CoordinatorSettings.load(args.config, **overrides)


def _serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    coordinator = Coordinator(settings)
    port = coordinator.start()
    os.umask(0o077)  # belt and braces: whatever else the process writes is for its own user only
    host = settings.address.rsplit(":", 1)[0]
    if settings.kit is None:
        _warn_if_exposed(settings.address, "submit jobs and read models")
        if settings.dashboard_address:
            _warn_if_exposed(settings.dashboard_address, "read every job's progress and metrics on the dashboard")
    notes = [f"mTLS, kit {settings.kit}" if settings.kit else "plaintext"]
    if coordinator.health_port is not None:
        notes.append(f"health on port {coordinator.health_port}")
    if coordinator.metrics_port is not None:
        notes.append(f"Prometheus metrics on port {coordinator.metrics_port}")
    if coordinator.dashboard_port is not None:
        notes.append(f"dashboard on port {coordinator.dashboard_port}")
    print(f"fedmeki coordinator listening on {host}:{port} ({'; '.join(notes)})", flush=True)
    stopped = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping gracefully", signum)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopped.wait()
    coordinator.stop()
    return 0


def _warn_if_exposed(address: str, what: str) -> None:
    if not is_loopback(address):  # served only with insecure_plaintext (Coordinator.start refuses otherwise)
        logger.warning(
            "listening on %s WITHOUT TLS: anyone who can reach it can %s; use it on a trusted network only",
            address,
            what,
        )


@contextmanager
def _database(args: argparse.Namespace) -> Iterator[Database]:
    """The coordinator's database, named in the log: an operator command on the wrong one is easy to miss."""
    settings = _settings(args)
    if settings.db is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    database = Database(settings.database_url)
    if {"db", "data_dir"} & settings.model_fields_set:  # chosen: a flag, FEDMEKI_COORDINATOR_*, or --config
        logger.info("database %s", make_url(settings.database_url).render_as_string(hide_password=True))
    else:
        logger.warning(
            "database %s: the default under ./%s (give --data-dir DIR or --db URL, as `serve` has, to use its own)",
            settings.database_url,
            settings.data_dir,
        )
    try:
        database.migrate()
        yield database
    finally:
        database.dispose()


def _silo_add(args: argparse.Namespace) -> int:
    ttl = _settings(args).enrollment_token_ttl
    with _database(args) as database:
        silo, token = SiloRegistry(database, ttl).add(args.name, args.role)
        AuditLog(database).record("silo add", OPERATOR, LOCAL, OK, detail=f"{silo.name} as {silo.role}")
    print(f"silo {silo.name} registered as {silo.role} (id {silo.id})")
    if _settings(args).kit is not None:  # an mTLS coordinator refuses token enrollment: no token to show
        print(f"mTLS: no token; its certificate (CN={silo.name}) is its credential: fedmeki-silo run --kit KIT_DIR")
        return 0
    print(f"with a startup kit (mTLS): nothing more to do; its certificate (CN={silo.name}) is its credential")
    print(f"without one, enrollment token (shown once, good for {ttl}): {token}")
    print(f"on the silo: fedmeki-silo enroll --coordinator HOST:PORT --token {token} --work-dir DIR")
    return 0


def _silo_token(args: argparse.Namespace) -> int:
    with _database(args) as database:
        token, expires = SiloRegistry(database, _settings(args).enrollment_token_ttl).new_token(args.name)
        AuditLog(database).record("silo token", OPERATOR, LOCAL, OK, detail=args.name)
    print(
        f"new enrollment token for silo {args.name} (shown once; the earlier one is void), good until "
        f"{expires.isoformat(timespec='seconds')}: {token}"
    )
    return 0


def _silo_list(args: argparse.Namespace) -> int:
    with _database(args) as database:
        silos = SiloRegistry(database).list()
    print(f"{'name':<24} {'role':<9} {'enrolled':<9} {'revoked':<8} {'device':<12} {'tasks':<30} last seen")
    for silo in silos:
        seen = silo.last_seen_at.isoformat(timespec="seconds") if silo.last_seen_at else "-"
        print(
            f"{silo.name:<24} {silo.role:<9} {'yes' if silo.enrolled else 'no':<9} "
            f"{'yes' if silo.revoked else 'no':<8} {silo.device or '-':<12} {','.join(silo.tasks) or '-':<30} {seen}"
        )
    return 0


def _silo_revoke(args: argparse.Namespace) -> int:
    with _database(args) as database:
        silo = SiloRegistry(database).revoke(args.name)
        AuditLog(database).record("silo revoke", OPERATOR, LOCAL, OK, detail=silo.name)
    print(f"silo {silo.name} revoked: its credential or certificate is refused from its next call on")
    return 0


def _cert_revoke(args: argparse.Namespace) -> int:
    if (args.serial is None) == (args.kit is None):
        raise InvalidInputError("name the certificate with exactly one of --serial HEX or --kit FOLDER")
    if args.kit is not None:
        identity = load_kit(args.kit).identity
        serial, subject = identity.serial, identity.label
    else:
        serial, subject = parse_serial(args.serial), ""
    named = f"{serial_text(serial)} ({subject})" if subject else serial_text(serial)
    with _database(args) as database:
        RevocationList(database).revoke(serial, subject, args.reason)
        AuditLog(database).record("cert revoke", OPERATOR, LOCAL, OK, detail=named)
    print(f"certificate {named} revoked: refused from its next call on")
    return 0


def _cert_list(args: argparse.Namespace) -> int:
    with _database(args) as database:
        revoked = RevocationList(database).list()
    print(f"{'serial':<42} {'subject':<32} {'revoked at':<26} reason")
    for entry in revoked:
        print(
            f"{entry.serial:<42} {entry.subject or '-':<32} {entry.revoked_at.isoformat(timespec='seconds'):<26} "
            f"{entry.reason or '-'}"
        )
    return 0


def _audit(args: argparse.Namespace) -> int:
    with _database(args) as database:
        entries = AuditLog(database).recent(args.limit)
    for entry in entries:
        round_text = "-" if entry.round_number is None else str(entry.round_number)
        print(
            f"{entry.at.isoformat(timespec='seconds')} {entry.actor:<28} {entry.action:<18} "
            f"job {entry.job_id or '-':<32} round {round_text:<4} {entry.status:<18} {entry.peer} {entry.detail}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeki-coordinator", description=__doc__)
    add_logging_options(parser, "INFO")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="YAML settings file")
    common.add_argument("--data-dir", type=Path, help="database (SQLite default), checkpoints and spooled updates")
    common.add_argument("--db", help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", parents=[common], help="run the gRPC coordinator")
    serve.add_argument("--address", help="HOST:PORT to listen on (port 0 picks a free one)")
    serve.add_argument("--kit", type=Path, help="the coordinator's startup kit (fedmeki provision): serve mTLS only")
    serve.add_argument(
        "--insecure-plaintext",
        action="store_true",
        default=None,
        help="without a kit, serve plaintext on a non-loopback address too (default: refuse; trusted networks only)",
    )
    serve.add_argument("--metrics-address", help="HOST:PORT for Prometheus metrics over plain HTTP (default: off)")
    serve.add_argument("--health-address", help="HOST:PORT for the gRPC health service alone, plaintext (default: off)")
    serve.add_argument(
        "--dashboard-address",
        help="HOST:PORT for the read-only web dashboard: HTTPS with the kit's certificates, else HTTP (default: off)",
    )
    serve.set_defaults(handler=_serve)
    silo = commands.add_parser("silo", help="manage hospitals").add_subparsers(dest="silo_command", required=True)
    add = silo.add_parser("add", parents=[common], help="register a silo and print its enrollment token")
    add.add_argument("name")
    add.add_argument("--kit", type=Path, help="the coordinator's kit, as serve has it: mTLS, so no enrollment token")
    add.add_argument(
        "--role",
        default="trainer",
        choices=ROLES,
        help="injector: runs jobs' knowledge-injection stage; evaluator: never trains, scores the checkpoints of "
        "the jobs that name it (evaluation.evaluator) on its held-out set (default trainer)",
    )
    add.set_defaults(handler=_silo_add)
    silo.add_parser("list", parents=[common], help="list silos").set_defaults(handler=_silo_list)
    token = silo.add_parser("token", parents=[common], help="a new enrollment token for a silo not yet enrolled")
    token.add_argument("name")
    token.set_defaults(handler=_silo_token)
    revoke = silo.add_parser("revoke", parents=[common], help="refuse a silo's credential from now on")
    revoke.add_argument("name")
    revoke.set_defaults(handler=_silo_revoke)
    cert = commands.add_parser("cert", help="revoke certificates").add_subparsers(dest="cert_command", required=True)
    cert_revoke = cert.add_parser("revoke", parents=[common], help="refuse a certificate from its next call on")
    cert_revoke.add_argument("--serial", help="the certificate's serial (hex, as fedmeki provision prints it)")
    cert_revoke.add_argument("--kit", type=Path, help="or the kit folder that holds the certificate")
    cert_revoke.add_argument("--reason", default="")
    cert_revoke.set_defaults(handler=_cert_revoke)
    cert.add_parser("list", parents=[common], help="list revoked certificates").set_defaults(handler=_cert_list)
    audit = commands.add_parser("audit", parents=[common], help="the newest audit rows: actions and refusals")
    audit.add_argument("--limit", type=int, default=50)
    audit.set_defaults(handler=_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
