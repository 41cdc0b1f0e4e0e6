"""`fedmeki-silo`: enroll once (or take a startup kit), then run the agent; `status` shows its state, `budget` its
privacy ledger."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fedmeki_core.channels import Keepalive
from fedmeki_core.commands import run_command
from fedmeki_core.errors import InvalidInputError, UnavailableError
from fedmeki_core.kits import Role, load_kit
from fedmeki_core.logs import add_logging_options
from fedmeki_core.metrics_endpoint import MetricsEndpoint
from fedmeki_core.rpc_errors import with_connection_hint
from silo_agent.privacy_budget import ledger_report
from silo_agent.settings import SiloSettings
from silo_agent.state import AgentState
from silo_agent.transport import GrpcTransport

logger = logging.getLogger("silo_agent")


def _enroll(args: argparse.Namespace) -> int:
    transport = GrpcTransport(args.coordinator)
    try:
        enrollment = transport.enroll(args.token)
    except UnavailableError as exc:
        raise with_connection_hint(exc, args.coordinator, tls=False) from None
    finally:
        transport.close()
    with AgentState(args.work_dir) as state:
        state.save_enrollment(enrollment)
    print(
        f"enrolled as silo {enrollment.silo_name} (id {enrollment.silo_id}); credential stored in "
        f"{args.work_dir / 'state.sqlite'}"
    )
    return 0


def _run(args: argparse.Namespace) -> int:
    # torch and TenSEAL load here, for `run` only: `enroll` and `status` start in a tenth of the time.
    from silo_agent.agent import SiloAgent
    from silo_agent.trainer import LocalTrainer

    settings = SiloSettings.from_yaml(
        args.config,
        coordinator=args.coordinator,
        work_dir=args.work_dir,
        device=args.device,
        kit=args.kit,
        metrics_address=args.metrics_address,
    )
    if not settings.data:
        raise InvalidInputError("no data configured: map at least one task to a dataset file under 'data'")
    kit = load_kit(settings.kit, Role.SILO) if settings.kit else None
    if kit is not None and "coordinator" not in settings.model_fields_set:
        settings = settings.model_copy(update={"coordinator": kit.coordinator})
    with AgentState(settings.work_dir) as state:
        silo_name, credential = (kit.name, "") if kit else _enrolled(state, settings)
        trainer = LocalTrainer.from_settings(settings)
        for task_name in settings.data:
            train, held_out = trainer.check_data(task_name)  # fail at start on missing or malformed data
            logger.info("task %s: %d training and %d held-out samples", task_name, train, held_out)
        keepalive = Keepalive(settings.keepalive_seconds, settings.keepalive_timeout_seconds)
        transport = GrpcTransport(
            settings.coordinator, credential, settings.chunk_bytes, settings.retry_max_seconds, kit, keepalive
        )
        agent = SiloAgent(settings, transport, state, trainer)
        endpoint = (
            MetricsEndpoint(agent.metrics.registry, settings.metrics_address) if settings.metrics_address else None
        )
        stop = threading.Event()

        def on_signal(signum: int, _frame: Any) -> None:
            logger.warning("signal %d: finishing the current step, then stopping (Ctrl-C again: at once)", signum)
            stop.set()
            # Off the signal handler: cancelling the poll takes the call's lock, which the main thread may hold.
            threading.Thread(target=transport.stop, name="stop-transport", daemon=True).start()
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts a retry's wait

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        print(
            f"silo {silo_name} running on {trainer.device_label}, coordinator {settings.coordinator}"
            + (" (mTLS)" if kit else ""),
            flush=True,
        )
        if endpoint is not None:
            print(f"Prometheus metrics on port {endpoint.start()}", flush=True)
        os.umask(0o077)  # what the agent writes from here on (deltas, downloads) is for its own user only
        try:
            agent.run(stop)
        finally:
            if endpoint is not None:
                endpoint.stop()
            transport.close()
    return 0


def _enrolled(state: AgentState, settings: SiloSettings) -> tuple[str, str]:
    """The silo's name and bearer credential from its token enrollment (plaintext coordinators)."""
    enrollment = state.enrollment()
    if enrollment is None:
        raise InvalidInputError(
            f"not enrolled: run `fedmeki-silo enroll --coordinator {settings.coordinator} "
            f"--token TOKEN --work-dir {settings.work_dir}` first, or start with a startup kit (--kit)"
        )
    if enrollment.coordinator != settings.coordinator:
        logger.warning(
            "enrolled with %s but configured for %s: the credential may not be valid there",
            enrollment.coordinator,
            settings.coordinator,
        )
    return enrollment.silo_name, enrollment.credential


def _status(args: argparse.Namespace) -> int:
    if not (args.work_dir / "state.sqlite").exists():
        print(f"not enrolled (no agent state in {args.work_dir})")
        return 0
    with AgentState(args.work_dir) as state:
        enrollment = state.enrollment()
        records = state.recent_tasks()
    if enrollment is None:
        print(
            "no token enrollment: a silo started with a startup kit (--kit) is identified by its certificate"
            if records
            else "not enrolled, and no task yet: enroll with a token (fedmeki-silo enroll), or run with --kit"
        )
    else:
        print(f"silo {enrollment.silo_name} (id {enrollment.silo_id}), coordinator {enrollment.coordinator}")
    for record in records:
        shown = "".join(
            f" {name}={record.metrics[name]:.4g}" for name in ("eval_accuracy", "train_loss") if name in record.metrics
        )
        if record.num_samples is not None:
            shown += f" samples={record.num_samples}"
        if record.delta is not None:
            shown += f" delta={record.delta.sha256[:12]}"
        print(f"  job {record.job_id} round {record.round:>3} {record.kind:<8} {record.status:<10}{shown}")
    return 0


def _budget(args: argparse.Namespace) -> int:
    settings = SiloSettings.from_yaml(args.config, work_dir=args.work_dir)
    if not (settings.work_dir / "state.sqlite").exists():
        raise InvalidInputError(f"no agent state in {settings.work_dir}: nothing has been charged there")
    with AgentState(settings.work_dir) as state:
        print("\n".join(ledger_report(state, settings.privacy_budget)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeki-silo", description=__doc__)
    add_logging_options(parser, "INFO")
    commands = parser.add_subparsers(dest="command", required=True)
    enroll = commands.add_parser("enroll", help="exchange the one-time token for this silo's credential")
    enroll.add_argument("--coordinator", required=True, help="HOST:PORT")
    enroll.add_argument("--token", required=True)
    enroll.add_argument("--work-dir", type=Path, required=True, help="where the agent keeps its state and files")
    enroll.set_defaults(handler=_enroll)
    run = commands.add_parser("run", help="poll for work and train until stopped (SIGTERM)")
    run.add_argument("--config", type=Path, help="silo.yaml")
    run.add_argument("--coordinator", help="HOST:PORT (overrides the config)")
    run.add_argument("--work-dir", type=Path)
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--kit", type=Path, help="this silo's startup kit (fedmeki provision): mTLS, no enrollment")
    run.add_argument("--metrics-address", help="HOST:PORT for Prometheus metrics over plain HTTP (default: off)")
    run.set_defaults(handler=_run)
    status = commands.add_parser("status", help="enrollment and recent tasks")
    status.add_argument("--work-dir", type=Path, required=True)
    status.set_defaults(handler=_status)
    budget = commands.add_parser("budget", help="the privacy ledger: what each job spent on each dataset, what is left")
    budget.add_argument("--work-dir", type=Path, help="the agent's work directory (overrides the config)")
    budget.add_argument("--config", type=Path, help="silo.yaml, for its privacy_budget (spent against the budgets)")
    budget.set_defaults(handler=_budget)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
