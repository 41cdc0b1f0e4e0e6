"""Builds models from a job's ModelSpec and the task they serve; names the tensors that cross the wire."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel

from fedmeki_core.architectures import ARCHITECTURES
from fedmeki_core.errors import FedmekiError, InvalidInputError, InvalidJobSpecError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.model_spec import ModelSpec
from fedmeki_core.tasks import SUITES, LabelType, TaskInfo, get_task, training_tasks
from fedmeki_core.wire import TensorSpec, read_manifest

_FROZEN_LM = "language_model."


class SequenceClassifier(nn.Module):
    """Feature vectors -> linear projection -> BERT encoder layers -> mean pool -> class logits."""

    def __init__(self, task: TaskInfo, config: dict[str, Any]) -> None:
        super().__init__()
        steps, channels = task.input_shape
        hidden = int(config["hidden_size"])
        self.input_projection = nn.Linear(channels, hidden)
        self.encoder = BertModel(
            BertConfig(
                vocab_size=1,  # inputs come as embeddings; the word table is unused and frozen
                hidden_size=hidden,
                num_hidden_layers=int(config["num_layers"]),
                num_attention_heads=int(config["num_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                hidden_dropout_prob=float(config["dropout"]),
                attention_probs_dropout_prob=float(config["dropout"]),
                max_position_embeddings=steps,
                type_vocab_size=1,
            ),
            add_pooling_layer=False,
        )
        self.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
        self.encoder.embeddings.token_type_embeddings.weight.requires_grad_(False)
        self.head = nn.Linear(hidden, task.num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(inputs_embeds=self.input_projection(features)).last_hidden_state
        logits: torch.Tensor = self.head(hidden.mean(dim=1))
        return logits


def build_model(spec: ModelSpec, task: str, seed: int = 0) -> nn.Module:
    """A freshly initialised model for a job's task (or suite); the same seed gives the same weights."""
    if spec.architecture not in ARCHITECTURES:
        raise InvalidJobSpecError("model.architecture", f"unknown architecture {spec.architecture!r}")
    config = {**ARCHITECTURES[spec.architecture], **spec.config}
    torch.manual_seed(seed)
    if spec.architecture.startswith("fedmeki-encoders"):
        from fedmeki_core.models.encoders import MultiTaskEncoders

        members = SUITES[task].tasks if task in SUITES else (task,)
        modalities = tuple(sorted({get_task(name).modality for name in members}))
        return MultiTaskEncoders(tuple(get_task(name) for name in training_tasks(task)), modalities, config)
    if task in SUITES:
        raise InvalidJobSpecError("task", f"{spec.architecture} trains one task, not the suite {task!r}")
    if spec.architecture in ("ct-classifier", "unet"):
        from fedmeki_core.models.ct import CtVolumeClassifier, UNet2d

        return CtVolumeClassifier(config) if spec.architecture == "ct-classifier" else UNet2d(config)
    if spec.architecture.startswith("tabular-"):
        from fedmeki_core.models.tabular import TabularModel, TabularRegressor

        info, classes = get_task(task), int(config["num_classes"])
        if info.label_type == LabelType.REGRESSION:
            if classes != 1 or spec.architecture == "tabular-logistic":
                raise InvalidJobSpecError(
                    "model", f"task {task} predicts one number: tabular-linear or tabular-mlp with num_classes 1"
                )
            return TabularRegressor(config)
        if spec.architecture == "tabular-linear":
            raise InvalidJobSpecError("model.architecture", f"task {task} is a classification: tabular-logistic")
        if classes < 2 or classes > info.num_classes or (info.label_type == LabelType.BINARY and classes != 2):
            most = 2 if info.label_type == LabelType.BINARY else info.num_classes
            raise InvalidJobSpecError(
                "model.config.num_classes", f"task {task} takes 2 to {most} classes, not {classes}"
            )
        return TabularModel(config)
    return SequenceClassifier(get_task(task), config)


def build_job_model(spec: JobSpec, base: Path | None = None, device: torch.device | None = None) -> nn.Module:
    """The model a job's rounds exchange: its ModelSpec's, on the pretrained base in the folder `base` where the
    job names one (loaded for a silo's `device`; without one, the submitter's unquantised build on the CPU, whose
    adapters and heads have the shapes a QLoRA silo trains), or with a federated injection the injection model."""
    if spec.model.pretrained is not None:
        from fedmeki_core.models.pretrained import build_pretrained

        if base is None:
            raise InvalidJobSpecError("model.pretrained", f"building {spec.model.pretrained!r} needs its folder")
        on = spec.model if device is not None else spec.model.model_copy(update={"quantization": "none"})
        return build_pretrained(on, spec.task, base, device or torch.device("cpu"), spec.seed)
    model = build_model(spec.model, spec.task, seed=spec.seed)
    if spec.injection is None or not spec.injection.federated:
        return model
    from fedmeki_core.models.encoders import MultiTaskEncoders
    from fedmeki_core.models.injection import build_injection_model, injection_settings, task_vocabulary

    assert isinstance(model, MultiTaskEncoders)  # the job spec allows injection with suites and these only
    config = {**ARCHITECTURES[spec.model.architecture], **spec.model.config}
    return build_injection_model(
        model,
        injection_settings(spec.injection),
        task_vocabulary([]),  # fixed by the catalogue: every silo and the submitter build the same table
        int(config["token_dim"]),
        seed=spec.seed,
        train_encoders=True,
    )


def exchanged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors a round exchanges, live: trainable parameters and floating-point buffers.

    Buffers are BatchNorm running statistics: averaged with the weights, as FedMEKI averages whole state dicts,
    so the injector's encoders normalise like the silos' ones (integer step counters stay local).
    """
    from fedmeki_core.models.pretrained import PretrainedModel

    state: dict[str, torch.Tensor] = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if isinstance(model, PretrainedModel):  # the base's buffers are its own, at every silo: never exchanged
        return state
    # A frozen language model's buffers (rotary tables) are rebuilt identically everywhere: never exchanged.
    buffers = {name: b for name, b in model.named_buffers() if not name.startswith(_FROZEN_LM)}
    state.update({name: buf for name, buf in buffers.items() if buf.is_floating_point()})
    return state


def restore_tensors(
    model: nn.Module, state: Mapping[str, torch.Tensor], prefix: str, names: Iterable[str] | None = None
) -> None:
    """Copy `state[prefix + name]` into each exchanged tensor of `model` (or of `names`) that the state holds."""
    tensors = exchanged_state(model)
    with torch.no_grad():
        for name in tensors if names is None else names:
            if f"{prefix}{name}" in state:
                tensors[name].copy_(state[f"{prefix}{name}"])


def store_tensors(
    model: nn.Module, state: dict[str, torch.Tensor], prefix: str, names: Iterable[str] | None = None
) -> None:
    """Keep each exchanged tensor of `model` (or of `names`) in `state` as `prefix + name`, float32 on the CPU."""
    tensors = exchanged_state(model)
    for name in tensors if names is None else names:
        state[f"{prefix}{name}"] = tensors[name].detach().to("cpu", torch.float32)


def exchanged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The exchanged tensors' values, detached, contiguous, on the CPU."""
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in exchanged_state(model).items()}


def task_view(model: nn.Module, task: str) -> nn.Module:
    """The job's model as a one-task model: a suite's encoders with the task's head, or the injection model."""
    from fedmeki_core.models.encoders import MultiTaskEncoders
    from fedmeki_core.models.injection import InjectionModel, InstructionTask

    if isinstance(model, MultiTaskEncoders):
        return model.for_task(task)
    if isinstance(model, InjectionModel):
        return InstructionTask(model, task)
    return model


def initial_tensors(spec: JobSpec, model: nn.Module) -> dict[str, torch.Tensor]:
    """Checkpoint 0 of a job: the exchanged tensors but the personal ones, and the algorithm's extras (zeros)."""
    return select_initial(spec, exchanged_tensors(model))


def select_initial(spec: JobSpec, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Of a model's exchanged `tensors`, checkpoint 0's: the shared ones and the algorithm's extras (zeros)."""
    from fedmeki_core.algorithms import get_algorithm
    from fedmeki_core.algorithms.base import extra_of, personal_names

    personal = personal_names(spec.algorithm.personal, tensors)
    if spec.algorithm.personal and not personal:
        raise InvalidJobSpecError("algorithm.personal", f"no tensor of {spec.model.architecture} matches them")
    for task in training_tasks(spec.task):
        if get_task(task).label_type == LabelType.SILO_CLASSES and f"heads.{task}.weight" not in personal:
            raise InvalidJobSpecError(
                "algorithm.personal",
                f"{task} has classes of each silo's own: its head must stay at the silos (e.g. 'heads.*')",
            )
    shared = {name: tensor for name, tensor in tensors.items() if name not in personal}
    if not shared:
        raise InvalidJobSpecError("algorithm.personal", "they match every tensor: nothing would be shared")
    extras = get_algorithm(spec.algorithm.name).extra_names(shared)
    return {**shared, **{name: torch.zeros_like(shared[extra_of(name)]) for name in extras}}


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
# The dtypes a checkpoint may give a float tensor of the model: its values are cast as they load.
LOADABLE_DTYPES = frozenset({"F32", "F16", "F64"})


def meta_model(spec: JobSpec) -> nn.Module:
    """The job's model (not on a pretrained base) built on torch's meta device: every tensor has its name, shape
    and dtype and none has storage, so nothing is allocated whatever the config asks for."""
    try:
        with torch.device("meta"):
            return build_job_model(spec)
    except FedmekiError:
        raise
    except Exception as exc:  # a builder's own refusal (transformers, torch): one line naming the model
        raise InvalidJobSpecError("model", f"{spec.model.architecture} cannot be built: {str(exc)[:200]}") from None


def expected_initial_manifest(spec: JobSpec, model: nn.Module | None = None) -> list[TensorSpec]:
    """The tensors (names, shapes, dtypes) a job's initial weights must hold, from its model built on the meta
    device (or `model`, that build)."""
    model = meta_model(spec) if model is None else model
    tensors = select_initial(spec, {name: t.detach() for name, t in exchanged_state(model).items()})
    return [
        TensorSpec(name, _SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape))
        for name, tensor in sorted(tensors.items())
    ]


def manifest_mismatch(expected: Sequence[TensorSpec], held: Sequence[TensorSpec], architecture: str) -> str | None:
    """The first way the tensors `held` (a checkpoint's header) differ from the `expected` ones, as one line naming
    the tensor (None: they match). A float tensor may be held in any of LOADABLE_DTYPES."""
    wanted = {tensor.name: tensor for tensor in expected}
    given = {tensor.name: tensor for tensor in held}
    if missing := sorted(wanted.keys() - given.keys()):
        return f"tensor {missing[0]!r} of {architecture} is missing"
    if unexpected := sorted(given.keys() - wanted.keys()):
        return f"tensor {unexpected[0]!r} is not one {architecture} exchanges"
    for name, tensor in sorted(wanted.items()):
        if given[name].shape != tensor.shape:
            return f"tensor {name!r} has shape {list(given[name].shape)}, the spec's model has {list(tensor.shape)}"
        if given[name].dtype not in LOADABLE_DTYPES:
            return f"tensor {name!r} is {given[name].dtype}, the model's is {tensor.dtype} (loads from F16, F32, F64)"
    return None


def check_initial_weights(spec: JobSpec, path: Path) -> None:
    """Refuse initial weights whose tensor names, shapes or dtypes are not those of the spec's model
    (InvalidJobSpecError naming the first such tensor), before they are sent: they would only fail at the hospitals."""
    expected = expected_initial_manifest(spec)
    try:
        held = read_manifest(path)
    except OSError as exc:
        raise InvalidInputError(f"cannot read the initial weights {path}: {exc.strerror}") from None
    if (mismatch := manifest_mismatch(expected, held, spec.model.architecture)) is not None:
        raise InvalidJobSpecError("model", f"{path}: {mismatch}")


def trained_tensors(model: nn.Module, tasks: Sequence[str]) -> set[str] | None:
    """The exchanged tensors that training `tasks` can change (None: all of them).

    A suite's encoders change only the encoders of the tasks' modalities and the tasks' own heads: a silo with
    data for some of a suite's tasks leaves the others' tensors as they were.
    """
    from fedmeki_core.models.encoders import MultiTaskEncoders

    if not isinstance(model, MultiTaskEncoders):
        return None
    modalities = {str(get_task(task).modality) for task in tasks}
    trained = set()
    for name in exchanged_state(model):
        group, member = name.split(".")[:2]
        if (group == "encoders" and member not in modalities) or (group == "heads" and member not in tasks):
            continue
        trained.add(name)
    return trained


def used_parameters(view: nn.Module) -> list[nn.Parameter]:
    """The parameters a one-task view's forward pass uses: a suite task's modality encoder and head, else all."""
    from fedmeki_core.models.encoders import TaskView

    if isinstance(view, TaskView):
        modality = str(get_task(view.task).modality)
        return [*view.model.encoders[modality].parameters(), *view.model.heads[view.task].parameters()]
    return list(view.parameters())


def fit_silo_heads(model: nn.Module, class_counts: dict[str, int], seed: int) -> None:
    """Resize the heads of tasks whose classes each silo defines to this silo's class counts (same seed, same
    initial head at every round: the head's trained values come from the silo's job state)."""
    from fedmeki_core.models.encoders import MultiTaskEncoders

    if not isinstance(model, MultiTaskEncoders):
        return
    for task, count in class_counts.items():
        head = model.heads[task]
        assert isinstance(head, nn.Linear)
        torch.manual_seed(seed)
        model.heads[task] = nn.Linear(head.in_features, count).to(head.weight.device)
