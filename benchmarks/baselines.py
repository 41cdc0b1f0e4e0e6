"""The floor and the ceiling of a federated table: each silo alone, and all silos' data in one place.

Both train the job's model with the silos' own local loop for as many epochs as the federated job's rounds add up
to, and are scored exactly as the federated model is: by each silo on its held-out split (the same split its agent
uses), averaged over silos weighted by held-out size. Neither involves the coordinator: no real hospital could run
the centralised one, which is the point of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedmeki_core.jobspec import JobSpec
from fedmeki_core.models.build import build_job_model, exchanged_tensors, task_view
from fedmeki_core.records import CheckpointInfo, RoundKind, RoundTask
from fedmeki_core.tasks import get_task, training_tasks
from fedmeki_core.tasks.dataset import ArrayDataset
from fedmeki_core.training import LocalSettings
from fedmeki_core.training.local_training import run_local_epochs
from fedmeki_core.wire import TensorSpec
from silo_agent.trainer import LocalTrainer, job_image_size

BASELINES = ("local", "centralised")


def _concat(parts: list[ArrayDataset]) -> ArrayDataset:
    masks = [p.masks for p in parts]
    return ArrayDataset(
        features=np.concatenate([p.features for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        masks=None if any(m is None for m in masks) else np.concatenate(masks),  # type: ignore[arg-type]
        questions=tuple(q for p in parts for q in p.questions),
        answers=tuple(a for p in parts for a in p.answers),
    )


def _train(spec: JobSpec, data: dict[str, ArrayDataset], device: torch.device, path: Path) -> RoundTask:
    """Train a fresh model of the job on `data` (task by task, as the silos do); save it; the task to score it."""
    model = build_job_model(spec).to(device)
    algorithm = spec.algorithm
    settings = LocalSettings(
        local_epochs=algorithm.local_epochs * spec.rounds,
        batch_size=algorithm.batch_size,
        learning_rate=algorithm.learning_rate,
        seed=spec.seed,
    )
    for name, dataset in data.items():
        run_local_epochs(task_view(model, name), dataset, settings, device, None, "adam")
    tensors = exchanged_tensors(model)
    save_file(tensors, str(path))
    manifest = [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(tensors.items())]
    checkpoint = CheckpointInfo("baseline", spec.rounds, path.stat().st_size, "")
    return RoundTask("baseline", spec.rounds + 1, RoundKind.EVALUATE, spec, checkpoint, manifest, 0.0)


def _weighted(scores: list[tuple[dict[str, float], dict[str, int]]], spec: JobSpec) -> dict[str, float]:
    """Per task, the silos' held-out scores weighted by their held-out sizes."""
    names = training_tasks(spec.task)
    result = {}
    for name in names:
        key = f"{name}.eval_{get_task(name).metric}" if len(names) > 1 else f"eval_{get_task(name).metric}"
        total = sum(sizes[name] for _, sizes in scores)
        result[name] = sum(metrics[key] * sizes[name] for metrics, sizes in scores) / total
    return result


def baseline_scores(kind: str, spec: JobSpec, trainers: list[LocalTrainer], work: Path) -> dict[str, float]:
    """Each training task's score of the `local` or `centralised` baseline."""
    size = job_image_size(RoundTask("baseline", 0, RoundKind.TRAIN, spec, CheckpointInfo("", 0, 0, ""), [], 0.0))
    names = training_tasks(spec.task)
    work.mkdir(parents=True, exist_ok=True)
    scores = []
    if kind == "local":
        for index, trainer in enumerate(trainers):
            own = {name: trainer.splits(name, size)[0] for name in names}
            task = _train(spec, own, trainer.device, work / f"local-{index}.safetensors")
            _, metrics = trainer.evaluate(task, work / f"local-{index}.safetensors")
            scores.append((metrics, {name: len(trainer.splits(name, size)[1]) for name in names}))
    else:
        pooled = {name: _concat([t.splits(name, size)[0] for t in trainers]) for name in names}
        task = _train(spec, pooled, trainers[0].device, work / "centralised.safetensors")
        for trainer in trainers:
            _, metrics = trainer.evaluate(task, work / "centralised.safetensors")
            scores.append((metrics, {name: len(trainer.splits(name, size)[1]) for name in names}))
    return _weighted(scores, spec)
