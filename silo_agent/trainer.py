"""LocalTrainer: evaluates the global model and trains it on the silo's own data, on the local device."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fedmeki_core.algorithms import EXTRA_PREFIX, get_algorithm
from fedmeki_core.algorithms.base import extra_of, personal_names
from fedmeki_core.architectures import ARCHITECTURES
from fedmeki_core.encodings import DeltaEncoding, EncodedPart, encoded_manifest
from fedmeki_core.errors import InvalidInputError, InvalidUpdateError
from fedmeki_core.faults import crash_point
from fedmeki_core.files import atomic_write
from fedmeki_core.models.build import (
    build_job_model,
    exchanged_state,
    fit_silo_heads,
    restore_tensors,
    store_tensors,
    task_view,
    trained_tensors,
)
from fedmeki_core.models.pretrained import load_tokenizer
from fedmeki_core.models.tabular import TabularModel
from fedmeki_core.overlapped_writer import OverlappedHashingWriter
from fedmeki_core.privacy.dp import clip_factor, gaussian_epsilon
from fedmeki_core.records import RoundTask
from fedmeki_core.tasks import LabelType, Modality, get_task, training_tasks
from fedmeki_core.tasks.dataset import ArrayDataset, load_dataset
from fedmeki_core.tasks.instructions import read_instructions, tokenize_instructions
from fedmeki_core.training import LocalSettings, RoundContext, client_half
from fedmeki_core.training.base import local_steps
from fedmeki_core.training.local_training import data_parallel_rank
from fedmeki_core.wire import TensorSpec, write_safetensors
from silo_agent.bases import BaseBudget, BaseRegistry
from silo_agent.error_feedback import ErrorFeedback, residual_store
from silo_agent.evaluation import evaluate_tasks, finite_metrics
from silo_agent.job_state import JobStateStore
from silo_agent.settings import SiloSettings
from silo_agent.sharding import gathered, shard, shards
from silo_agent.statistics import normalised

logger = logging.getLogger(__name__)
_PERSONAL = "personal/"  # the job state's copy of the personal tensors (algorithm.personal)


def _personal_metric(key: str) -> str:
    """`eval_accuracy` -> `personal_eval_accuracy`; `lung-opacity.eval_f1.n` -> `lung-opacity.personal_eval_f1.n`."""
    return key.replace("eval_", "personal_eval_", 1)


_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _encode(name: str, delta: torch.Tensor, dtype: str) -> np.ndarray[Any, Any]:
    """The delta's bytes in a wire dtype, as a numpy array of the same item size (bfloat16 as raw int16)."""
    encoded = delta.to(_TORCH_DTYPES[dtype]).contiguous()
    if not bool(torch.isfinite(encoded).all()):
        raise InvalidUpdateError(f"training diverged: the delta of {name!r} has non-finite values in {dtype}")
    return (encoded.view(torch.int16) if dtype == "BF16" else encoded).numpy()


def job_image_size(task: RoundTask) -> int | None:
    """The sample size the job's model takes: the image side, or a table's num_features (None: fixed shapes)."""
    config = {**ARCHITECTURES[task.spec.model.architecture], **task.spec.model.config}
    size = config.get("image_size", config.get("num_features"))
    return None if size is None else int(size)


def load_exchanged(
    model: torch.nn.Module, checkpoint: Path, manifest: list[TensorSpec]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Copy a checkpoint's model tensors into the model; returns (model tensors, the algorithm's extra tensors)
    as float32: the global values deltas start from."""
    tensors = load_file(str(checkpoint))
    state = exchanged_state(model)
    for spec in manifest:
        in_model = spec.name.startswith(EXTRA_PREFIX) or spec.name in state
        if spec.name not in tensors or not in_model:
            raise InvalidUpdateError(
                f"tensor {spec.name!r} of the manifest is missing from the checkpoint or the model"
            )
        shapes = {tuple(tensors[spec.name].shape)}
        if spec.name in state:
            shapes.add(tuple(state[spec.name].shape))
        if shapes != {spec.shape}:
            raise InvalidUpdateError(f"tensor {spec.name!r}: shape does not match the manifest {list(spec.shape)}")
    extras = {s.name: tensors[s.name].to(torch.float32) for s in manifest if s.name.startswith(EXTRA_PREFIX)}
    shared = [s for s in manifest if s.name not in extras]
    with torch.no_grad():
        for spec in shared:
            state[spec.name].copy_(tensors[spec.name])
    return {spec.name: tensors[spec.name].to(torch.float32) for spec in shared}, extras


def autocast_for(device: torch.device, mixed_precision: str) -> str:
    """The autocast dtype to train with: never on the CPU; `auto` is bf16 where the GPU supports it, else fp16."""
    if device.type != "cuda" or mixed_precision == "off":
        return "off"
    if mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return mixed_precision


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

    def __init__(
        self,
        device: torch.device,
        data: Mapping[str, Path],
        holdout_fraction: float,
        micro_batch_size: int | None = None,
        mixed_precision: str = "auto",
        models: Mapping[str, Path] | None = None,
        budget: BaseBudget | None = None,
        sharding: str = "none",
    ) -> None:
        self.device = device
        self.sharding = sharding
        self.bases = BaseRegistry(models or {}, device, budget)
        self.micro_batch_size = micro_batch_size
        self.autocast = autocast_for(device, mixed_precision)
        self._data_files = dict(data)
        self._holdout_fraction = holdout_fraction
        self._splits: dict[tuple[str, int | str | None], tuple[ArrayDataset, ArrayDataset]] = {}
        self.on_step: Callable[[int], None] = lambda step: None  # after each optimiser step (the agent's metrics)

    @classmethod
    def from_settings(cls, settings: SiloSettings) -> LocalTrainer:
        """On the settings' device; an unknown device or a GPU that is not there is an InvalidInputError."""
        return cls(
            resolve_device(settings.device),
            settings.data,
            settings.holdout_fraction,
            settings.micro_batch_size,
            settings.mixed_precision,
            settings.models,
            BaseBudget(settings.max_lora_rank, settings.max_sequence_length),
            settings.sharding,
        )

    @property
    def device_label(self) -> str:
        """The device for people: `cuda:0 (NVIDIA H100 ...)` or `cpu`."""
        if self.device.type == "cuda":
            precision = "" if self.autocast == "off" else f", {self.autocast} autocast"
            return f"{self.device} ({torch.cuda.get_device_name(self.device)}{precision})"
        return str(self.device)

    def splits(self, task_name: str, image_size: int | None = None) -> tuple[ArrayDataset, ArrayDataset]:
        """The (train, evaluation) split of the silo's data for a task, loaded once."""
        if (task_name, image_size) not in self._splits:
            if task_name not in self._data_files:
                raise InvalidInputError(f"this silo has no data for task {task_name!r}")
            dataset = load_dataset(self._data_files[task_name], get_task(task_name), image_size)
            self._splits[task_name, image_size] = dataset.split(self._holdout_fraction, seed=0)
        return self._splits[task_name, image_size]

    def job_splits(self, task: RoundTask, name: str) -> tuple[ArrayDataset, ArrayDataset]:
        """A task's split as the job's model takes it: images at its size, or text in its base's tokens."""
        if get_task(name).modality != Modality.TEXT:
            train, held_out = normalised(task.spec.normalise, self.splits(name, job_image_size(task)))
            return train, held_out
        base = task.spec.model.pretrained
        if base is None or name not in self._data_files:
            raise InvalidInputError(f"task {name!r} needs a pretrained causal LM's tokenizer and this silo's data")
        max_length = int({**ARCHITECTURES[task.spec.model.architecture], **task.spec.model.config}["max_length"])
        key = (name, f"{base}/{max_length}")
        if key not in self._splits:
            examples = read_instructions(self._data_files[name])
            tokens = tokenize_instructions(examples, load_tokenizer(self.bases.folder(base)), max_length)
            self._splits[key] = tokens.split(self._holdout_fraction, seed=0)
        return self._splits[key]

    def check_data(self, name: str) -> tuple[int, int]:
        """(training, held-out) examples of a task's file, read and checked (text: before any tokenizer)."""
        if get_task(name).modality == Modality.TEXT:
            count = len(read_instructions(self._data_files[name]))
            held_out = max(1, round(count * self._holdout_fraction))
            return count - held_out, held_out
        training, held = self.splits(name)
        return len(training), len(held)

    def own_tasks(self, task: RoundTask) -> list[str]:
        """The job's training tasks this silo holds data for (a suite's silos may hold some of them)."""
        names = training_tasks(task.spec.task)
        own = [name for name in names if name in self._data_files]
        if not own:
            raise InvalidInputError(f"this silo has no data for {task.spec.task!r} (its tasks: {', '.join(names)})")
        return own

    def evaluate(
        self, task: RoundTask, checkpoint: Path, job_state: JobStateStore | None = None
    ) -> tuple[int, dict[str, float]]:
        """Metrics of the checkpoint (with the silo's personal tensors) on the held-out split: (samples, eval_*)."""
        model, _, _ = self._load(task, checkpoint)
        self._restore_personal(task, model, job_state.load(task.round) if job_state else {})
        held_out = {name: self.job_splits(task, name)[1] for name in self.own_tasks(task)}
        scores = evaluate_tasks(model, held_out, self.device, with_table=True)
        return sum(map(len, held_out.values())), finite_metrics(scores)

    def train(
        self,
        task: RoundTask,
        checkpoint: Path,
        delta_path: Path,
        reuse: Path | None = None,
        job_state: JobStateStore | None = None,
    ) -> TrainingResult:
        """Evaluate the global model, train it with the algorithm's client half, write local - global.

        A suite's training tasks are trained one after the other on the shared encoders, as FedMEKI does. What
        the client half keeps for its next round (and the personal tensors) goes to `job_state`.
        """
        algorithm = task.spec.algorithm
        entry = get_algorithm(algorithm.name)
        client = client_half(entry, options := entry.resolve_options(algorithm.options))
        sharded = shards(self.sharding, task.spec, client)  # a job that cannot train sharded is declined here
        model, global_tensors, extras = self._load(task, checkpoint, sharded)
        state = job_state.load(task.round) if job_state else {}
        personal = self._restore_personal(task, model, state)
        names = self.own_tasks(task)
        splits = {name: self.job_splits(task, name) for name in names}
        trained = trained_tensors(model, names)
        untrained = frozenset() if trained is None else frozenset(global_tensors.keys() - trained)
        settings = LocalSettings(
            local_epochs=algorithm.local_epochs,
            batch_size=algorithm.batch_size,
            learning_rate=algorithm.learning_rate,
            seed=task.spec.seed * 100003 + task.round,
            options=options,
            micro_batch_size=self.micro_batch_size,
            autocast=self.autocast,
        )
        context = RoundContext(global_tensors=global_tensors, extras=extras, state=state, untrained=untrained)
        client.begin(model, context)
        metrics = evaluate_tasks(model, {name: held for name, (_, held) in splits.items()}, self.device)
        personalised = {
            name: view
            for name, (train_split, _) in splits.items()
            if (view := client.personalised(model, name, train_split, settings, self.device)) is not None
        }
        if personalised:
            scores = evaluate_tasks(personalised, {name: splits[name][1] for name in personalised}, self.device)
            metrics.update({_personal_metric(key): value for key, value in scores.items()})
        train_losses = []
        for name, (train_split, _) in splits.items():
            report_every = max(1, local_steps(settings, len(train_split)) // 10)

            def progress(step: int, total: int, loss: float, name: str = name, every: int = report_every) -> None:
                self.on_step(step)
                crash_point("silo.mid_training")
                if step % every == 0 or step == total:
                    logger.info(
                        "job %s round %d %s: step %d/%d, loss %.4f", task.job_id, task.round, name, step, total, loss
                    )

            result = client.train(task_view(model, name), train_split, settings, self.device, progress)
            train_losses.append(result["train_loss"])
            if len(names) > 1:
                metrics[f"{name}.train_loss"] = result["train_loss"]
        metrics["train_loss"] = float(np.mean(train_losses))
        client.finish(model, context)
        current = gathered(exchanged_state(model)) if sharded else exchanged_state(model)
        store_tensors(model, context.state, _PERSONAL, personal)
        missing = [name for name in extras if name not in context.extra_deltas]
        if missing:
            raise InvalidUpdateError(f"{algorithm.name} left no delta for the extra tensor {missing[0]!r}")
        if data_parallel_rank()[0] != 0:  # another rank of a several-device round: rank 0 writes, once
            return TrainingResult(delta_path, "", 0, {})
        if job_state is not None:
            job_state.save(task.round, context.state)
        order = sorted(task.manifest, key=lambda spec: spec.name)
        floats = [TensorSpec(s.name, "F32", s.shape) for s in order]
        encoding = DeltaEncoding.of(task.spec)
        wire = encoded_manifest(floats, encoding)
        feedback = None
        if encoding.feedback:
            feedback = ErrorFeedback(encoding, None if job_state is None else residual_store(job_state), task.round)

        def delta_of(name: str) -> torch.Tensor:
            if name in extras:
                return context.extra_deltas[name].to("cpu", torch.float32)
            delta = current[name].detach().to("cpu", torch.float32) - global_tensors[name]
            return delta if context.delta_scale == 1.0 else delta * context.delta_scale

        dp = task.spec.privacy.dp
        scale, noise_std, noise = 1.0, 0.0, torch.Generator()
        if dp is not None and dp.mode == "local":  # clip the whole delta, then noise every coordinate
            squares = ((delta_of(s.name).double() ** 2).sum() for s in floats)
            norm = float(torch.sqrt(sum(squares, torch.zeros((), dtype=torch.float64))))
            scale, noise_std = clip_factor(norm, dp.clip_norm), dp.noise_multiplier * dp.clip_norm
            noise.manual_seed(secrets.randbits(63))  # fresh OS entropy: the noise must not be guessable
            if dp.noise_multiplier > 0:  # each round this silo takes part in is one release
                metrics["dp_epsilon"] = gaussian_epsilon(dp.noise_multiplier, task.round, dp.delta)

        skipped = untrained | {name for name in extras if extra_of(name) in untrained}
        parts = {spec.name: spec for spec in wire}

        def deltas() -> Iterator[np.ndarray[Any, Any]]:  # one tensor at a time, never the whole delta
            for spec in floats if feedback is not None else wire:
                delta = delta_of(spec.name) * scale
                if noise_std > 0:
                    delta += torch.randn(delta.shape, generator=noise) * noise_std
                if feedback is None:
                    yield _encode(spec.name, delta, spec.dtype)
                    continue
                part = parts[spec.name]
                assert isinstance(part, EncodedPart)
                yield from feedback.encode(spec.name, delta, part, spec.name not in skipped)

        with atomic_write(delta_path, reuse) as f, OverlappedHashingWriter(f) as writer:
            write_safetensors(writer, wire, deltas(), untrained=skipped, steps=context.local_steps)
        if feedback is not None:
            feedback.save()
        return TrainingResult(
            delta_path=delta_path,
            sha256=writer.hexdigest(),
            num_samples=sum(len(train_split) for train_split, _ in splits.values()),
            metrics=finite_metrics(metrics),
        )

    def _load(
        self, task: RoundTask, checkpoint: Path, sharded: bool = False
    ) -> tuple[torch.nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The job's model with the checkpoint's weights, the global model tensors and the algorithm's extras."""
        name = task.spec.model.pretrained
        base = None if name is None else self.bases.folder(name)
        model = build_job_model(task.spec, base, torch.device("cpu") if sharded else self.device)
        fit_silo_heads(model, self._class_counts(task), task.spec.seed)
        if isinstance(model, TabularModel):
            self._check_classes(task, model.classes)
        global_tensors, extras = load_exchanged(model, checkpoint, task.manifest)
        if task.spec.model.quantization == "4bit":  # placed on the device as it was quantised
            return model, global_tensors, extras
        return (shard(model, self.device) if sharded else model.to(self.device)), global_tensors, extras

    def _check_classes(self, task: RoundTask, classes: int) -> None:
        """Refuse labels the model has no class for (a table whose schema has more levels than num_classes)."""
        for name in self.own_tasks(task):
            train, held_out = self.splits(name, job_image_size(task))
            highest = int(max(train.labels.max(initial=0), held_out.labels.max(initial=0)))
            if highest >= classes:
                raise InvalidInputError(
                    f"task {name}: this silo's labels reach class {highest}, the job's model has {classes} classes "
                    "(model.config.num_classes)"
                )

    def _class_counts(self, task: RoundTask) -> dict[str, int]:
        """This silo's own class count of each of its tasks whose classes each silo defines."""
        counts = {}
        for name in self.own_tasks(task):
            if get_task(name).label_type == LabelType.SILO_CLASSES:
                train, held_out = self.job_splits(task, name)
                counts[name] = int(max(train.labels.max(initial=0), held_out.labels.max(initial=0))) + 1
        return counts

    @staticmethod
    def _restore_personal(task: RoundTask, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Put the silo's own values of the job's personal tensors into the model (the seed's in its first round)."""
        personal = sorted(personal_names(task.spec.algorithm.personal, exchanged_state(model)))
        restore_tensors(model, state, _PERSONAL, personal)
        return personal
