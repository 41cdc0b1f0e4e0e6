"""`fedmeki`: the researcher's command line (job submit/watch/list/show/cancel/download), `stats show`, `demo`, `he`,
`bench`."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

from fedmeki_core.app.attack_command import add_attack_command
from fedmeki_core.app.he_commands import add_he_command
from fedmeki_core.app.import_command import add_import_command
from fedmeki_core.app.job_view import follow, print_job
from fedmeki_core.app.kit_bundle import add_kit_command
from fedmeki_core.app.provision import add_provision_command
from fedmeki_core.app.statistics_command import add_stats_command, print_statistics
from fedmeki_core.client import FedmekiClient
from fedmeki_core.commands import run_command
from fedmeki_core.encodings import ENCODINGS
from fedmeki_core.errors import FedmekiError
from fedmeki_core.jobspec import load_job_spec
from fedmeki_core.kits import Role, load_kit
from fedmeki_core.logs import add_logging_options
from fedmeki_core.records import JobState
from fedmeki_core.tasks.federation import PARTITIONS

DEFAULT_COORDINATOR = "127.0.0.1:50051"


def _client(args: argparse.Namespace) -> FedmekiClient:
    """A client as the kit's researcher or admin (mTLS), or plaintext; the kit also names the coordinator."""
    kit = load_kit(args.kit, Role.RESEARCHER, Role.ADMIN) if args.kit else None
    address = args.coordinator or (kit.coordinator if kit else DEFAULT_COORDINATOR)
    return FedmekiClient(address, kit=kit)


def _submit(args: argparse.Namespace) -> int:
    spec = load_job_spec(args.spec)
    with _client(args) as client:
        job = client.submit_job(
            spec,
            args.weights,
            args.ckks_public_context,
            args.base,
            request_id=args.request_id,
            injection_base=args.injection_base,
        )
        print(f"submitted job {job.id} ({spec.name})")
        if args.watch:
            final = follow(client.watch_job(job.id))
            return 0 if final is not None and final.state == JobState.COMPLETED else 1
    return 0


def _watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        final = follow(client.watch_job(args.job_id))
    return 0 if final is not None and final.state == JobState.COMPLETED else 1


def _list(args: argparse.Namespace) -> int:
    states = [JobState(s) for s in args.state]
    with _client(args) as client:
        jobs = client.list_jobs(states)
    print(f"{'id':<34} {'name':<24} {'state':<10} {'round':<8} task")
    for job in jobs:
        print(
            f"{job.id:<34} {job.spec.name[:24]:<24} {job.state.value:<10} "
            f"{job.current_round}/{job.spec.rounds:<6} {job.spec.task}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.job_id)
        print_job(job)
        if job.spec.statistics is not None:
            print_statistics(client, job)
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedmeki_core.report import format_report
    from fedmeki_core.round_report import round_rows, rows_csv, rows_json, rows_table

    with _client(args) as client:
        job = client.get_job(args.job_id)
    rows = round_rows(job)
    if args.format == "csv":
        text = rows_csv(rows)
    elif args.format == "json":
        text = rows_json(job, rows) + "\n"
    else:
        text = f"{format_report(job)}\n\n{rows_table(rows, args.per_silo)}\n"
    if args.output is None:
        print(text, end="")
    else:
        args.output.write_text(text)
        print(f"report of job {job.id} ({args.format}, {len(rows)} rows) written to {args.output}")
    if args.plot is not None:
        from fedmeki_core.app.report_plot import plot_curves

        plot_curves(rows, args.plot, f"job {job.id[:8]} ({job.spec.name}): {job.spec.task}")
        print(f"learning curves of job {job.id} written to {args.plot}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job_id, args.reason)
    print(f"job {job.id}: {job.state.value}")
    return 0


def _download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.download_checkpoint(args.job_id, args.output, args.round)
    print(f"checkpoint of round {info.round} written to {args.output} ({info.size_bytes} B, sha256 {info.sha256})")
    return 0


_BENCHMARKS = {  # name -> module in benchmarks/
    "round": "round",
    "scale": "scale",
    "wan": "wan",
    "sweep": "sweep",
    "chunks": "chunks",
    "flower": "vs_flower",
    "fedmeki": "fedmeki_grid",
    "training": "training",
    "he": "he_cost",
    "pretrained": "pretrained",
    "peft": "peft_throughput",
}


def _bench(args: argparse.Namespace) -> int:
    """Run a benchmark from the source checkout's benchmarks/ package (it is not installed with fedmeki)."""
    root = Path(__file__).resolve().parents[2]
    module = _BENCHMARKS[args.benchmark]
    if not (root / "benchmarks" / f"{module}.py").is_file():
        raise FedmekiError(f"fedmeki bench needs a source checkout: {root / 'benchmarks'} is missing")
    command = [sys.executable, "-m", f"benchmarks.{module}", *args.arguments]
    return subprocess.run(command, cwd=root, check=False).returncode


def _demo(args: argparse.Namespace) -> int:
    from fedmeki_core.app.demo import run_demo, run_fedmeki_demo

    run = run_fedmeki_demo if args.workload == "fedmeki" else run_demo
    if args.secure_aggregation != "none":
        if args.workload != "vitals":
            raise FedmekiError(
                f"--secure-aggregation {args.secure_aggregation} runs with the vitals workload (the injector needs "
                "plaintext)"
            )
        return run_demo(args.data_dir, args.rounds, args.silos, args.delta_encoding, args.secure_aggregation)
    return run(args.data_dir, rounds=args.rounds, silos=args.silos, delta_encoding=args.delta_encoding)


def _synth(args: argparse.Namespace) -> int:
    from fedmeki_core.tasks.federation import write_synthetic_federation

    federation = write_synthetic_federation(
        args.task,
        args.silos,
        args.samples,
        args.out,
        image_size=args.image_size,
        partition=args.partition,
        alpha=args.alpha,
        public_fraction=args.public_fraction,
        seed=args.seed,
    )
    for index, files in enumerate(federation.silos):
        print(f"silo-{index}: " + ", ".join(f"{task} -> {path}" for task, path in files.items()))
    if federation.injector:
        print("injector: " + ", ".join(f"{task} -> {path}" for task, path in federation.injector.items()))
    return 0


def _algorithms(args: argparse.Namespace) -> int:
    from fedmeki_core.algorithms import ALGORITHMS
    from fedmeki_core.algorithms.robust import METHODS, RobustAggregation
    from fedmeki_core.algorithms.update_limits import LIMIT_OPTIONS

    for entry in ALGORITHMS.values():
        options = ", ".join(f"{name}={value!r}" for name, value in entry.defaults.items()) or "none"
        print(f"{entry.name:<10} {entry.description}\n{'':<10} options (defaults): {options}")
    fields = ", ".join(
        f"{f.name}={getattr(RobustAggregation(), f.name)!r}" for f in dataclasses.fields(RobustAggregation)
    )
    print(f"every algorithm also takes the option robust: {{{fields}}}; methods: {', '.join(METHODS)}")
    print(f"and the update limits (off by default): {', '.join(LIMIT_OPTIONS)}")
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from fedmeki_core.tasks import SUITES, TASKS

    print(f"{'task':<28} {'modality':<10} {'role':<10} {'format':<22} {'metrics':<38} source")
    for task in TASKS.values():
        metrics = ", ".join(task.metrics)
        print(
            f"{task.name:<28} {task.modality:<10} {task.role:<10} {task.source_format:<22} {metrics:<38} "
            f"{task.source_dataset}"
        )
    for suite in SUITES.values():
        print(f"\nsuite {suite.name}: {suite.description}")
        print(f"  train: {', '.join(suite.train)}\n  zero-shot: {', '.join(suite.zero_shot)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedmeki", description=__doc__)
    add_logging_options(parser, "WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="coordinator + silos on loopback, one FedAvg job, end to end")
    demo.add_argument("--data-dir", type=Path, default=Path("fedmeki-demo"), help="where the demo's files go")
    demo.add_argument("--rounds", type=int, default=3)
    demo.add_argument("--silos", type=int, default=3)
    demo.add_argument("--delta-encoding", default="float32", choices=ENCODINGS)
    demo.add_argument(
        "--workload",
        default="vitals",
        choices=["vitals", "fedmeki"],
        help="vitals: FedAvg on one synthetic task; fedmeki: the 8-task suite with knowledge injection",
    )
    demo.add_argument(
        "--secure-aggregation",
        default="none",
        choices=["none", "ckks", "cyclic"],
        help="ckks: silos encrypt their deltas (TenSEAL CKKS); the coordinator only adds ciphertexts; cyclic: the "
        "encrypted running sum goes silo to silo through the coordinator, which only relays it",
    )
    demo.set_defaults(handler=_demo)
    add_provision_command(commands)
    add_kit_command(commands)
    add_he_command(commands, DEFAULT_COORDINATOR)
    add_attack_command(commands)

    bench = commands.add_parser("bench", help="measure the platform (see docs/benchmarks.md)")
    bench.add_argument(
        "benchmark",
        choices=sorted(_BENCHMARKS),
        help="round: round time against the raw-gRPC bound; scale: many silos (2 to 512) on one coordinator, with "
        "its threads, descriptors and memory; wan: rounds through emulated WAN links against the "
        "links' bound; sweep: the same over sizes and silos; "
        "fedmeki: the FedMEKI approach grid (algorithms x splits, federated and injected model, 8 tasks); "
        "training: a silo's local-training throughput on its CPU and GPU; "
        "he: the cost of CKKS secure aggregation (encrypt, add, decrypt, bytes); "
        "pretrained: a ~1B Llama-shaped base federated with LoRA on the CPU (silo memory, round time, bytes); "
        "peft: LoRA/QLoRA tokens/s through fedmeki against a plain PEFT loop (--shape 7b on a GPU, tiny on a CPU); "
        "chunks: round time and coordinator memory against the chunk size; "
        "flower: the round benchmark's model through Flower's Deployment Runtime (also: round --vs flower)",
    )
    bench.add_argument("arguments", nargs=argparse.REMAINDER, help="passed on, e.g. --params 100M --silos 2")
    bench.set_defaults(handler=_bench)

    algorithms = commands.add_parser("algorithms", help="the FL algorithms a job can name, with their options")
    algorithms.set_defaults(handler=_algorithms)
    tasks = commands.add_parser("tasks", help="the tasks and suites a job can name")
    tasks.set_defaults(handler=_tasks)
    data = commands.add_parser("data", help="prepare a silo's local data").add_subparsers(
        dest="data_command", required=True
    )
    add_import_command(data)
    synth = data.add_parser("synth", help="synthetic data for a task or suite, split into silos and the injector")
    synth.add_argument("--task", required=True, help="a task or a suite (see fedmeki tasks)")
    synth.add_argument("--silos", type=int, default=3)
    synth.add_argument("--samples", type=int, default=600, help="samples per training task, before the split")
    synth.add_argument("--out", type=Path, required=True, help="folder for silo-<i>/ and injector/")
    synth.add_argument("--image-size", type=int, help="X-ray side in pixels (default 224; fedmeki-encoders-tiny: 32)")
    synth.add_argument("--partition", choices=PARTITIONS, default="iid")
    synth.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (with --partition dirichlet)")
    synth.add_argument("--public-fraction", type=float, default=0.1, help="share of each training task kept public")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_synth)

    job = commands.add_parser("job", help="submit and follow jobs").add_subparsers(dest="job_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--coordinator", help=f"HOST:PORT of the coordinator (default: the kit's, or {DEFAULT_COORDINATOR})"
    )
    common.add_argument(
        "--kit", type=Path, help="your startup kit (fedmeki provision): mTLS as its researcher or admin"
    )
    submit = job.add_parser("submit", parents=[common], help="submit a job spec (YAML)")
    submit.add_argument("spec", type=Path)
    submit.add_argument("--weights", type=Path, help="initial weights (.safetensors); default: built from the spec")
    submit.add_argument(
        "--base", type=Path, help="your copy of model.pretrained (a save_pretrained folder): fingerprint, weights"
    )
    submit.add_argument(
        "--injection-base", type=Path, help="your copy of injection.pretrained (a save_pretrained folder): fingerprint"
    )
    submit.add_argument("--watch", action="store_true", help="follow the job until it ends")
    submit.add_argument(
        "--ckks-public-context", type=Path, help="public.ckks of the federation (privacy.secure_aggregation: ckks)"
    )
    submit.add_argument(
        "--request-id",
        help="your id of this submission (default: a fresh one): the same id again answers the job it created",
    )
    submit.set_defaults(handler=_submit)
    watch = job.add_parser("watch", parents=[common], help="follow a job's progress live")
    watch.add_argument("job_id")
    watch.set_defaults(handler=_watch)
    listing = job.add_parser("list", parents=[common], help="list jobs")
    listing.add_argument("--state", action="append", default=[], choices=[s.value for s in JobState])
    listing.set_defaults(handler=_list)
    show = job.add_parser("show", parents=[common], help="a job's state, rounds and metrics")
    show.add_argument("job_id")
    show.set_defaults(handler=_show)
    report = job.add_parser(
        "report", parents=[common], help="a job's metrics per round, task and silo; CSV, JSON, learning curves"
    )
    report.add_argument("job_id")
    report.add_argument("--format", choices=("table", "csv", "json"), default="table")
    report.add_argument("--per-silo", action="store_true", help="the table shows each silo's row, not only 'all'")
    report.add_argument("-o", "--output", type=Path, help="write the report to this file instead of stdout")
    report.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the learning curves (needs matplotlib)")
    report.set_defaults(handler=_report)
    cancel = job.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job_id")
    cancel.add_argument("--reason", default="")
    cancel.set_defaults(handler=_cancel)
    download = job.add_parser("download", parents=[common], help="download a job's model")
    download.add_argument("job_id")
    download.add_argument("-o", "--output", type=Path, required=True)
    download.add_argument("--round", type=int, default=-1, help="checkpoint round (default: latest)")
    download.set_defaults(handler=_download)
    add_stats_command(commands, common, _client)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
