"""ResourceBudget: the most a job may ask of this silo (silo.yaml), and why it declines a job over it.

The job's model is built on torch's meta device (names, shapes and dtypes, no storage) and compared with the
round's manifest (the checkpoint's safetensors header the coordinator sends) and with the budget, before anything
is downloaded or allocated: a researcher's config can make no hospital allocate a model it did not agree to.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from torch import nn

from fedmeki_core.errors import FedmekiError
from fedmeki_core.models.build import expected_initial_manifest, manifest_mismatch, meta_model
from fedmeki_core.recent import Recent
from fedmeki_core.records import RoundTask
from fedmeki_core.wire import TensorSpec, itemsize
from silo_agent.settings import SiloSettings

logger = logging.getLogger(__name__)

_FLOAT32_BYTES = 4
# Per trained parameter, besides its value: its gradient and Adam's two moments, float32 each (the largest state of
# a client half's optimiser; SGD keeps less). Activations are left out: micro_batch_size bounds those.
_TRAINING_COPIES = 3
_REMEMBERED_JOBS = 64  # the reasons of this many recent jobs are kept, so a round's polls build its model once


@dataclass(frozen=True)
class Footprint:
    """What a model asks of a silo: its parameters (trained and frozen) and an estimate of its training memory."""

    parameters: int
    device_bytes: int

    @classmethod
    def of(cls, model: nn.Module) -> Footprint:
        """Of a model built on the meta device: the bytes of its parameters and buffers at their own dtypes, plus
        `_TRAINING_COPIES` float32 tensors per trained parameter (gradient and optimiser state)."""
        tensors = itertools.chain(model.parameters(), model.buffers())
        weights = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
        return cls(
            parameters=sum(parameter.numel() for parameter in model.parameters()),
            device_bytes=weights + trained * _TRAINING_COPIES * _FLOAT32_BYTES,
        )


def checkpoint_bytes(manifest: list[TensorSpec]) -> int:
    """The bytes of a checkpoint's tensors, from its manifest (the silo downloads, stores and loads them whole)."""
    total = 0
    for spec in manifest:
        count = 1
        for dimension in spec.shape:
            count *= dimension
        total += count * itemsize(spec.dtype)
    return total


def _size(count: int) -> str:
    """Bytes for people: `5.00 GiB`, `1.50 MiB`, `76,224 bytes`."""
    if count >= 2**30:
        return f"{count / 2**30:.2f} GiB"
    return f"{count / 2**20:.2f} MiB" if count >= 2**20 else f"{count:,} bytes"


class ResourceBudget:
    """The most parameters, checkpoint bytes and device memory a job may ask of this silo."""

    def __init__(self, max_parameters: int, max_checkpoint_bytes: int, max_device_memory_bytes: int) -> None:
        self.max_parameters = max_parameters
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self.max_device_memory_bytes = max_device_memory_bytes
        self._reasons: Recent[str, str | None] = Recent(_REMEMBERED_JOBS)

    @classmethod
    def from_settings(cls, settings: SiloSettings) -> ResourceBudget:
        return cls(settings.max_parameters, settings.max_checkpoint_bytes, settings.max_device_memory_bytes)

    def checkpoint_refusal(self, task: RoundTask) -> str | None:
        """Why this silo declines the task's job for the size of its checkpoint (one line), or None."""
        size = checkpoint_bytes(task.manifest)
        if size > self.max_checkpoint_bytes:
            return (
                f"the job's checkpoint of {_size(size)} is over this silo's max_checkpoint_bytes "
                f"({_size(self.max_checkpoint_bytes)})"
            )
        return None

    def model_refusal(self, task: RoundTask) -> str | None:
        """Why this silo declines the task's job for its checkpoint or its model (one line), or None."""
        if task.job_id not in self._reasons:
            self._reasons.put(task.job_id, self.checkpoint_refusal(task) or self._model_reason(task))
        return self._reasons.get(task.job_id)

    def _model_reason(self, task: RoundTask) -> str | None:
        spec = task.spec
        if spec.model.pretrained is not None:
            return None  # the base is this silo's own copy; bases.py bounds what trains on it (LoRA rank, length)
        try:
            model = meta_model(spec)
            expected = expected_initial_manifest(spec, model)
        except FedmekiError as exc:
            return f"the job's model cannot be built here: {exc.message}"
        footprint = Footprint.of(model)
        logger.info(
            "job %s: %s of %d parameters, about %s to train",
            task.job_id,
            spec.model.architecture,
            footprint.parameters,
            _size(footprint.device_bytes),
        )
        if footprint.parameters > self.max_parameters:
            return (
                f"the job's {spec.model.architecture} has {footprint.parameters:,} parameters, over this silo's "
                f"max_parameters ({self.max_parameters:,})"
            )
        if footprint.device_bytes > self.max_device_memory_bytes:
            return (
                f"the job's {spec.model.architecture} needs about {_size(footprint.device_bytes)} to train (weights, "
                f"gradients, optimiser state), over this silo's max_device_memory_bytes "
                f"({_size(self.max_device_memory_bytes)})"
            )
        if (mismatch := manifest_mismatch(expected, task.manifest, spec.model.architecture)) is not None:
            return f"the job's checkpoint does not match its model: {mismatch}"
        return None
