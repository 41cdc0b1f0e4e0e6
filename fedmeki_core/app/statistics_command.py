"""`fedmeki stats show JOB`: a statistics job's result as a table, JSON or CSV (fedmeki_core/statistics_table.py)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidInputError, PreconditionError
from fedmeki_core.privacy.he import CkksContext, read_secret_context
from fedmeki_core.privacy.he.policy import uses_ckks
from fedmeki_core.records import JobState, JobStatus
from fedmeki_core.statistics_ckks import decrypt_sums, suppress_small_cells
from fedmeki_core.statistics_table import FeatureRow, as_csv, as_json, as_text, rows
from fedmeki_core.wire import iter_tensors


def statistics_table(client: FedmekiClient, job_id: str, secret: CkksContext | None = None) -> list[FeatureRow]:
    """A completed statistics job's rows: every feature's global figures, then each silo's where released. A job
    summed under CKKS needs the federation's `secret` context: its sums are decrypted here and the minimum cell
    count applied to them before any row is made."""
    job = client.get_job(job_id)
    statistics = job.spec.statistics
    if statistics is None:
        raise InvalidInputError(f"job {job_id} is a training job, not a statistics job")
    if job.state != JobState.COMPLETED:
        raise PreconditionError(f"statistics job {job_id} is {job.state.value}: its result comes when it completes")
    encrypted = uses_ckks(job.spec)
    if encrypted and secret is None:
        raise InvalidInputError(
            f"statistics job {job_id} summed its figures under CKKS: decrypt them with --ckks-secret-context"
        )
    if not encrypted and secret is not None:
        raise InvalidInputError(f"statistics job {job_id} is in the clear: leave --ckks-secret-context out")
    with tempfile.TemporaryDirectory(prefix="fedmeki-stats-") as tmp:
        path = Path(tmp) / "result"
        client.download_checkpoint(job_id, path)
        if secret is not None:
            tensors = suppress_small_cells(statistics, decrypt_sums(secret, statistics, path))
        else:
            tensors = {spec.name: np.array(value, dtype=np.float64) for spec, value in iter_tensors(path)}
    return rows(statistics, tensors, extremes=not encrypted)


def print_statistics(client: FedmekiClient, job: JobStatus) -> None:
    """`job show`'s part for a statistics job: its global figures once it completes, and where the rest is."""
    more = f"`fedmeki stats show {job.id}`"
    if uses_ckks(job.spec):
        print(f"  statistics: summed under CKKS; {more[:-1]} --ckks-secret-context secret.ckks` decrypts them")
        return
    if job.state != JobState.COMPLETED:
        print(f"  statistics: {more} prints them when the job completes")
        return
    print("  statistics (global; per-silo rows where released, JSON and CSV: " + more + "):")
    table = as_text([row for row in statistics_table(client, job.id) if row.scope == "global"])
    print("\n".join(f"    {line}" for line in table.splitlines()))


_FORMATS = {"table": as_text, "json": as_json, "csv": as_csv}


def add_stats_command(
    commands: Any, common: argparse.ArgumentParser, client: Callable[[argparse.Namespace], FedmekiClient]
) -> None:
    """`fedmeki stats show` on the main parser's subcommands; `client` makes the researcher's client."""
    stats = commands.add_parser("stats", help="federated statistics jobs' results").add_subparsers(
        dest="stats_command", required=True
    )
    show = stats.add_parser("show", parents=[common], help="a statistics job's per-feature table (global, per silo)")
    show.add_argument("job_id")
    show.add_argument("--format", choices=sorted(_FORMATS), default="table")
    show.add_argument("-o", "--output", type=Path, help="write it to this file instead of stdout")
    show.add_argument(
        "--ckks-secret-context", type=Path, help="the federation's secret.ckks: decrypt a job summed under CKKS"
    )

    def handler(args: argparse.Namespace) -> int:
        secret = None if args.ckks_secret_context is None else read_secret_context(args.ckks_secret_context)
        with client(args) as researcher:
            text = _FORMATS[args.format](statistics_table(researcher, args.job_id, secret))
        if args.output is None:
            print(text)
        else:
            args.output.write_text(text + "\n", encoding="utf-8")
            print(f"statistics of job {args.job_id} written to {args.output}")
        return 0

    show.set_defaults(handler=handler)
