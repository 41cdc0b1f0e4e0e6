"""How fast a silo trains: local-training throughput of a task's model on this machine's devices and precisions.

    python -m benchmarks.training --architecture fedmeki-encoders --task lung-opacity --image-size 224
    (or: fedmeki bench training ...)

Each configuration runs the silos' own local loop (`run_local_epochs`) on synthetic data: one warm-up epoch,
then `--epochs` timed epochs. Prints a table and, last, one JSON line with every configuration's figures; the
speed-ups are against the first configuration measured in the same run (the CPU, float32).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from fedmeki_core.architectures import ARCHITECTURES
from fedmeki_core.model_spec import ModelSpec
from fedmeki_core.models.build import build_model
from fedmeki_core.tasks import SUITES
from fedmeki_core.tasks.synthetic import generate
from fedmeki_core.training import LocalSettings
from fedmeki_core.training.local_training import run_local_epochs


@dataclass(frozen=True)
class Figure:
    device: str
    precision: str
    samples_per_second: float
    seconds_per_epoch: float
    final_loss: float
    peak_gpu_bytes: int


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(args: argparse.Namespace) -> dict[str, int]:
    return {} if args.image_size is None else {"image_size": args.image_size}


def measure(args: argparse.Namespace, device: torch.device, precision: str) -> Figure:
    # A suite's model is its multi-task encoders, timed on the suite's first training task.
    data_task = SUITES[args.task].train[0] if args.task in SUITES else args.task
    model = build_model(ModelSpec(architecture=args.architecture, config=_config(args)), args.task, seed=0)
    for_task = getattr(model, "for_task", None)
    if for_task is not None:
        model = for_task(data_task)
    model.to(device)
    image_size = args.image_size or ARCHITECTURES[args.architecture].get("image_size")
    data = generate(data_task, args.samples, 0, 1, seed=0, image_size=image_size)
    settings = LocalSettings(
        local_epochs=1,
        batch_size=args.batch_size,
        learning_rate=1e-4,
        seed=0,
        autocast=precision if device.type == "cuda" else "off",
    )
    run_local_epochs(model, data, settings, device, None, "adam")  # warm-up: kernels, allocator, caches
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = LocalSettings(**{**asdict(settings), "local_epochs": args.epochs})
    _synchronise(device)
    started = time.perf_counter()
    metrics = run_local_epochs(model, data, timed, device, None, "adam")
    _synchronise(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return Figure(
        device=str(device),
        precision=precision,
        samples_per_second=args.samples * args.epochs / seconds,
        seconds_per_epoch=seconds / args.epochs,
        final_loss=metrics["train_loss"],
        peak_gpu_bytes=peak,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.training", description=__doc__)
    parser.add_argument("--architecture", default="fedmeki-encoders")
    parser.add_argument("--task", default="lung-opacity", help="a task, or a suite (its first training task)")
    parser.add_argument("--image-size", type=int, default=None, help="X-ray side in pixels (default: the model's)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="measure the CPU too")
    args = parser.parse_args(argv)

    runs: list[tuple[torch.device, str]] = [(torch.device("cpu"), "fp32")] if args.cpu else []
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        runs += [(cuda, "off"), (cuda, "bf16")]
    if not runs:
        parser.error("nothing to measure: --no-cpu on a machine without a CUDA device")
    figures = []
    for device, precision in runs:
        figure = measure(args, device, precision)
        figures.append(figure)
        print(
            f"{figure.device:>6} {figure.precision:>4}: {figure.samples_per_second:9.1f} samples/s, "
            f"{figure.seconds_per_epoch:7.2f} s/epoch, loss {figure.final_loss:.3f}, "
            f"peak GPU memory {figure.peak_gpu_bytes / 2**20:.0f} MiB",
            flush=True,
        )
    base = figures[0].samples_per_second
    summary = {
        "architecture": args.architecture,
        "task": args.task,
        "image_size": args.image_size,
        "samples": args.samples,
        "batch_size": args.batch_size,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "figures": [{**asdict(f), "speedup": f.samples_per_second / base} for f in figures],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
