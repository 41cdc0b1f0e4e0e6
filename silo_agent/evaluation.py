"""Evaluation of a job's model on a silo's held-out splits: the eval_* metrics each round reports."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch

from fedmeki_core.models.build import task_view
from fedmeki_core.models.injection import InstructionTask
from fedmeki_core.models.pretrained import PretrainedCausalLM
from fedmeki_core.tasks import LabelType, get_task
from fedmeki_core.tasks.dataset import ArrayDataset
from fedmeki_core.tasks.metrics import classification_metrics
from fedmeki_core.tasks.regression import regression_metrics
from fedmeki_core.tasks.scoring import binary_scores
from fedmeki_core.tasks.segmentation import segmentation_metrics

logger = logging.getLogger(__name__)

_EVAL_BATCH = 256


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Metrics without the non-finite ones (a diverged global model evaluates to an infinite loss): metrics only
    describe the round, and the coordinator refuses a report that carries one, which would lose a valid delta."""
    dropped = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if dropped:
        logger.warning("dropping non-finite metrics %s (the model has diverged?)", ", ".join(dropped))
    return {name: value for name, value in metrics.items() if math.isfinite(value)}


def evaluate_tasks(
    model: torch.nn.Module | Mapping[str, torch.nn.Module],
    held_out: Mapping[str, ArrayDataset],
    device: torch.device,
    with_table: bool = False,
) -> dict[str, float]:
    """eval_* metrics of each task; with several tasks, per task as `<task>.eval_*` and, of the figures every
    task has, their mean as eval_* (counts and intervals stay per task). A binary task's reliability table
    only `with_table` (the final evaluation), which keeps each training round's report small.

    `model` is the job's model, or one model per task (a personalised task view each)."""
    per_task = {}
    for name, data in held_out.items():
        view = model[name] if isinstance(model, Mapping) else task_view(model, name)
        binary = get_task(name).label_type == LabelType.BINARY
        per_task[name] = evaluate_view(view, data, device, binary, with_table)
    if len(per_task) == 1:
        return next(iter(per_task.values()))
    metrics = {f"{name}.{key}": value for name, scores in per_task.items() for key, value in scores.items()}
    shared = set.intersection(*(set(scores) for scores in per_task.values()))
    for key in sorted(key for key in shared if "." not in key):
        metrics[key] = float(np.mean([scores[key] for scores in per_task.values()]))
    return metrics


def evaluate_view(
    model: torch.nn.Module, data: ArrayDataset, device: torch.device, binary: bool, with_table: bool
) -> dict[str, float]:
    """eval_* metrics of a one-task model on one held-out split, in batches on `device`."""
    model.eval()
    if isinstance(model, PretrainedCausalLM):  # answer-token loss and scores of greedy answers
        with torch.no_grad():
            features, labels = (torch.from_numpy(a).to(device) for a in (data.features, data.labels))
            scores = model.scores(features, labels, list(data.answers))
        return {f"eval_{name}": value for name, value in scores.items()}
    if isinstance(model, InstructionTask):  # scored from generated answers, as the injected model is
        with torch.no_grad():
            answers = [
                text
                for start in range(0, len(data), _EVAL_BATCH)
                for text in model.answer(torch.from_numpy(data.features[start : start + _EVAL_BATCH]).to(device))
            ]
        return {f"eval_{name}": value for name, value in binary_scores(answers, data.labels.tolist()).items()}
    logits = []
    with torch.no_grad():
        for start in range(0, len(data), _EVAL_BATCH):
            batch = torch.from_numpy(data.features[start : start + _EVAL_BATCH]).to(device)
            logits.append(model(batch).float().cpu().numpy())
    outputs = np.concatenate(logits)
    if data.masks is not None:
        return {f"eval_{name}": value for name, value in segmentation_metrics(outputs, data.masks).items()}
    if data.targets is not None:
        return {f"eval_{name}": value for name, value in regression_metrics(outputs[:, 0], data.targets).items()}
    scores = classification_metrics(outputs, data.labels, binary, with_table)
    return {f"eval_{name}": value for name, value in scores.items()}
