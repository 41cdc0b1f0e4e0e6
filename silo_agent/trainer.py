"""LocalTrainer: evaluates the global model and trains it on the silo's own data, on the local device."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fedmeki_core.algorithms import LocalSettings, get_algorithm
from fedmeki_core.errors import InvalidInputError, InvalidUpdateError
from fedmeki_core.files import HashingWriter, atomic_write
from fedmeki_core.models.build import build_model
from fedmeki_core.privacy.dp import clip_factor, gaussian_epsilon
from fedmeki_core.records import RoundTask
from fedmeki_core.tasks import get_task
from fedmeki_core.tasks.dataset import ArrayDataset, load_dataset
from fedmeki_core.tasks.metrics import classification_metrics
from fedmeki_core.wire import TensorSpec, wire_manifest, write_safetensors
from silo_agent.settings import SiloSettings

logger = logging.getLogger(__name__)

_EVAL_BATCH = 256


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _encode(name: str, delta: torch.Tensor, dtype: str) -> np.ndarray[Any, Any]:
    """The delta's bytes in a wire dtype, as a numpy array of the same item size (bfloat16 as raw int16)."""
    encoded = delta.to(_TORCH_DTYPES[dtype]).contiguous()
    if not bool(torch.isfinite(encoded).all()):
        raise InvalidUpdateError(f"training diverged: the delta of {name!r} has non-finite values in {dtype}")
    return (encoded.view(torch.int16) if dtype == "BF16" else encoded).numpy()


def resolve_device(name: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; a GPU that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = InvalidInputError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise unknown from None
    if device.type not in ("cpu", "cuda"):
        raise unknown
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {name!r}: this machine has no CUDA device (use auto or cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices here")
    return device


@dataclass(frozen=True)
class TrainingResult:
    delta_path: Path
    sha256: str
    num_samples: int
    metrics: dict[str, float]


class LocalTrainer:
    """Trains and evaluates on `device`; each task's data is loaded once and split (train, holdout) with seed 0."""

    def __init__(self, device: torch.device, data: Mapping[str, Path], holdout_fraction: float) -> None:
        self.device = device
        self._data_files = dict(data)
        self._holdout_fraction = holdout_fraction
        self._splits: dict[str, tuple[ArrayDataset, ArrayDataset]] = {}

    @classmethod
    def from_settings(cls, settings: SiloSettings) -> LocalTrainer:
        """On the settings' device; an unknown device or a GPU that is not there is an InvalidInputError."""
        return cls(resolve_device(settings.device), settings.data, settings.holdout_fraction)

    @property
    def device_label(self) -> str:
        """The device for people: `cuda:0 (NVIDIA H100 ...)` or `cpu`."""
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)

    def splits(self, task_name: str) -> tuple[ArrayDataset, ArrayDataset]:
        """The (train, evaluation) split of the silo's data for a task, loaded once."""
        if task_name not in self._splits:
            if task_name not in self._data_files:
                raise InvalidInputError(f"this silo has no data for task {task_name!r}")
            info = get_task(task_name)
            dataset = load_dataset(self._data_files[task_name], info)
            self._splits[task_name] = dataset.split(self._holdout_fraction, seed=0)
        return self._splits[task_name]

    def evaluate(self, task: RoundTask, checkpoint: Path) -> tuple[int, dict[str, float]]:
        """Metrics of the checkpoint on the held-out split: (samples, eval_loss/eval_accuracy/eval_f1)."""
        model, _ = self._load(task, checkpoint)
        _, held_out = self.splits(task.spec.task)
        return len(held_out), self._evaluate(model, held_out)

    def train(self, task: RoundTask, checkpoint: Path, delta_path: Path, reuse: Path | None = None) -> TrainingResult:
        """Evaluate the global model, train it with the algorithm's client half, write local - global."""
        model, global_tensors = self._load(task, checkpoint)
        train_split, held_out = self.splits(task.spec.task)
        metrics = self._evaluate(model, held_out)
        algorithm = task.spec.algorithm
        entry = get_algorithm(algorithm.name)
        options = entry.resolve_options(algorithm.options)
        settings = LocalSettings(
            local_epochs=algorithm.local_epochs,
            batch_size=algorithm.batch_size,
            learning_rate=algorithm.learning_rate,
            seed=task.spec.seed * 100003 + task.round,
            options=options,
        )
        report_every = max(1, algorithm.local_epochs * -(-len(train_split) // algorithm.batch_size) // 10)

        def progress(step: int, total: int, loss: float) -> None:
            if step % report_every == 0 or step == total:
                logger.info("job %s round %d: step %d/%d, loss %.4f", task.job_id, task.round, step, total, loss)

        metrics.update(entry.client(options).train(model, train_split, settings, self.device, progress))
        parameters = dict(model.named_parameters())
        order = sorted(task.manifest, key=lambda spec: spec.name)

        wire = wire_manifest([TensorSpec(s.name, "F32", s.shape) for s in order], task.spec.delta_encoding)

        def delta_of(name: str) -> torch.Tensor:
            return parameters[name].detach().to("cpu", torch.float32) - global_tensors[name]

        dp = task.spec.privacy.dp
        scale, noise_std, noise = 1.0, 0.0, torch.Generator()
        if dp is not None and dp.mode == "local":  # clip the whole delta, then noise every coordinate
            norm = float(torch.sqrt(sum((delta_of(s.name).double() ** 2).sum() for s in wire)))
            scale, noise_std = clip_factor(norm, dp.clip_norm), dp.noise_multiplier * dp.clip_norm
            noise.manual_seed(secrets.randbits(63))  # fresh OS entropy: the noise must not be guessable
            if dp.noise_multiplier > 0:  # each round this silo takes part in is one release
                metrics["dp_epsilon"] = gaussian_epsilon(dp.noise_multiplier, task.round, dp.delta)

        def deltas() -> Iterator[np.ndarray[Any, Any]]:  # one tensor at a time, never the whole delta
            for spec in wire:
                delta = delta_of(spec.name) * scale
                if noise_std > 0:
                    delta += torch.randn(delta.shape, generator=noise) * noise_std
                yield _encode(spec.name, delta, spec.dtype)

        with atomic_write(delta_path, reuse) as f:
            writer = HashingWriter(f)
            write_safetensors(writer, wire, deltas())
        return TrainingResult(
            delta_path=delta_path, sha256=writer.hexdigest(), num_samples=len(train_split), metrics=metrics
        )

    def _load(self, task: RoundTask, checkpoint: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        model = build_model(task.spec.model, get_task(task.spec.task), seed=task.spec.seed)
        tensors = load_file(str(checkpoint))
        parameters = dict(model.named_parameters())
        for spec in task.manifest:
            if spec.name not in tensors or spec.name not in parameters:
                raise InvalidUpdateError(
                    f"tensor {spec.name!r} of the manifest is missing from the checkpoint or the model"
                )
            if tuple(tensors[spec.name].shape) != spec.shape or tuple(parameters[spec.name].shape) != spec.shape:
                raise InvalidUpdateError(f"tensor {spec.name!r}: shape does not match the manifest {list(spec.shape)}")
        with torch.no_grad():
            for spec in task.manifest:
                parameters[spec.name].copy_(tensors[spec.name])
        global_tensors = {spec.name: tensors[spec.name].to(torch.float32) for spec in task.manifest}
        return model.to(self.device), global_tensors

    def _evaluate(self, model: torch.nn.Module, data: ArrayDataset) -> dict[str, float]:
        model.eval()
        logits = []
        with torch.no_grad():
            for start in range(0, len(data), _EVAL_BATCH):
                batch = torch.from_numpy(data.features[start : start + _EVAL_BATCH]).to(self.device)
                logits.append(model(batch).float().cpu().numpy())
        scores = classification_metrics(np.concatenate(logits), data.labels)
        return {f"eval_{name}": value for name, value in scores.items()}
