"""The FedMEKI grid's pretrained-ViT path (`--pretrained-vit FOLDER`): each x-ray training task federated on a
pretrained ViT each silo holds (architecture `image-classifier`, LoRA on q_proj / v_proj and a new head), next to
the suite's own encoders trained from scratch. One job per task on the same split and silos as the cell's suite
job; its row is the final evaluation round's score of each x-ray task (the other columns are not its tasks)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.records import JobState, JobStatus, RoundKind
from fedmeki_core.tasks import SUITES, get_task

XRAY_TASKS = tuple(task for task in SUITES["fedmeki"].train if get_task(task).modality == "xray")
BASE = "vit"  # the name the silos map the folder to in their `models`


def vit_image_size(folder: Path) -> int:
    """The image size of the ViT in `folder` (its config.json); the grid's images must have it."""
    config = json.loads((folder / "config.json").read_text())
    return int(config["image_size"])


def vit_spec(algorithm: str, partition: str, args: argparse.Namespace, task: str) -> JobSpec:
    return parse_job_spec(
        {
            "name": f"grid-{algorithm}-{partition}-{task}-vit",
            "task": task,
            "rounds": args.rounds,
            "min_silos": args.silos,
            "round_deadline_seconds": args.round_deadline,
            "seed": args.seed,
            "delta_encoding": args.delta_encoding,
            "model": {
                "architecture": "image-classifier",
                "pretrained": BASE,
                "config": {"image_size": args.image_size},
                "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            },
            "algorithm": {"name": algorithm, "local_epochs": 2, "batch_size": 32, "learning_rate": 2e-3},
        }
    )


def vit_row(label: str, jobs: dict[str, JobStatus], columns: tuple[str, ...]) -> dict[str, str]:
    """The row of a cell's pretrained-ViT jobs: each x-ray task's score in its job's final evaluation round."""
    row = {"approach": f"{label} / pretrained-vit / federated", **dict.fromkeys(columns, "-")}
    for task, job in jobs.items():
        if job.state != JobState.COMPLETED:
            row[task] = "failed: " + job.reason.replace("|", "/")
            continue
        final = next((r for r in reversed(job.rounds) if r.kind == RoundKind.EVALUATE), None)
        key = f"eval_{get_task(task).metric}"
        row[task] = f"{final.metrics[key]:.3f}" if final is not None and key in final.metrics else "-"
    return row
