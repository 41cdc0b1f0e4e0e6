"""The pretrained bases this silo holds (silo.yaml `models`), and why it would decline a job's base.

A job on a pretrained base carries the base's fingerprint; the silo checks its own folder against it before it
downloads or allocates anything. Fingerprints are cached per folder while its weight files stay unchanged.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmeki_core.architectures import ARCHITECTURES
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.models.base_folder import fingerprint, safetensors_files

logger = logging.getLogger(__name__)

_Stamp = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class BaseBudget:
    """The largest LoRA rank and sequence length this silo trains (None: no bound of its own)."""

    max_lora_rank: int | None = None
    max_sequence_length: int | None = None

    def excess(self, spec: JobSpec) -> str | None:
        rank = spec.model.lora.rank if spec.model.lora is not None else None
        if rank is not None and self.max_lora_rank is not None and rank > self.max_lora_rank:
            return f"LoRA rank {rank} is above this silo's max_lora_rank {self.max_lora_rank}"
        length = {**ARCHITECTURES[spec.model.architecture], **spec.model.config}.get("max_length")
        if length is not None and self.max_sequence_length is not None and int(length) > self.max_sequence_length:
            return f"max_length {length} is above this silo's max_sequence_length {self.max_sequence_length}"
        return None


class BaseRegistry:
    def __init__(self, models: Mapping[str, Path], device: torch.device, budget: BaseBudget | None = None) -> None:
        self._models = dict(models)
        self._device = device
        self._budget = budget or BaseBudget()
        self._fingerprints: dict[Path, tuple[_Stamp, str]] = {}

    def folder(self, name: str) -> Path:
        if name not in self._models:
            raise InvalidInputError(f"base {name!r} is not among this silo's models")
        return self._models[name]

    def decline_reason(self, spec: JobSpec) -> str | None:
        """Why this silo cannot train the job's base (one line naming the model), or None when it can."""
        name = spec.model.pretrained
        if name is None:
            return None
        if name not in self._models:
            held = ", ".join(sorted(self._models)) or "none"
            return f"base model {name!r} is not mapped in this silo's models (it holds: {held})"
        if (excess := self._budget.excess(spec)) is not None:
            return f"base model {name!r}: {excess}"
        if spec.model.quantization == "4bit":
            if self._device.type != "cuda":
                return f"base model {name!r}: quantization 4bit (QLoRA) needs CUDA; this silo trains on the CPU"
            if importlib.util.find_spec("bitsandbytes") is None:
                return f"base model {name!r}: quantization 4bit (QLoRA) needs bitsandbytes, not installed here"
        return self._other_copy(name, spec.model.fingerprint)

    def injection_base(self, spec: JobSpec) -> Path | None:
        """The folder of the injection stage's language model (None: tiny-llama, built from its config); a base this
        injector does not hold as the job's fingerprint says is an InvalidInputError naming it."""
        injection = spec.injection
        if injection is None or injection.pretrained is None:
            return None
        name = injection.pretrained
        if name not in self._models:
            held = ", ".join(sorted(self._models)) or "none"
            raise InvalidInputError(f"base model {name!r} is not mapped in this injector's models (it holds: {held})")
        reason = self._other_copy(name, injection.fingerprint)
        if reason is not None:
            raise InvalidInputError(reason)
        return self._models[name]

    def _other_copy(self, name: str, expected: str) -> str | None:
        """Why this silo's folder of `name` is not the base of fingerprint `expected` (None: it is)."""
        try:
            own = self._fingerprint(self._models[name])
        except InvalidInputError as exc:
            return f"base model {name!r}: {exc.message}"
        if own != expected:
            return (
                f"base model {name!r}: this silo's copy has fingerprint {own[:16]}…, "
                f"the job's is {expected[:16] or '(none)'}…: a different base"
            )
        return None

    def _fingerprint(self, folder: Path) -> str:
        files = safetensors_files(folder)
        stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        cached = self._fingerprints.get(folder)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        value = fingerprint(folder)
        self._fingerprints[folder] = (stamp, value)
        logger.info("base folder %s: fingerprint %s", folder, value[:16])
        return value
