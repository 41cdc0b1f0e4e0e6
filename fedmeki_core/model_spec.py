"""ModelSpec: the model a job trains, an architecture of the registry (fedmeki_core/architectures.py) or a silo's
pretrained base with LoRA adapters and heads."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from fedmeki_core.option_types import has_type_of, shown
from fedmeki_core.spec_rules import Spec, field_error, reading_stored, submitting

_MODULE_NAME = r"^[A-Za-z0-9_.-]{1,256}$"  # a module of the base: its name, or the end of its dotted name
_MODULE_PATTERN = r"^[A-Za-z0-9_.*?\[\]-]{1,256}$"  # modules of the base: an fnmatch pattern of their names


class LoraSpec(Spec):
    """LoRA adapters (peft) on the named modules of a pretrained base: what trains, with the heads."""

    rank: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1, le=4096)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = Field(default=("q_proj", "v_proj"), min_length=1, max_length=64)

    @field_validator("target_modules")
    @classmethod
    def _module_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _module_names(value, _MODULE_NAME)


def _module_names(value: tuple[str, ...], pattern: str) -> tuple[str, ...]:
    for name in value:
        if not re.fullmatch(pattern, name):
            raise ValueError(f"{name[:80]!r} is not a module name or pattern of 1 to 256 characters")
    return value


class ModelSpec(Spec):
    architecture: str = "tiny-transformer"
    config: dict[str, Any] = Field(default_factory=dict)
    # A pretrained base each silo holds (silo.yaml `models: {NAME: folder}`); only adapters and heads travel.
    pretrained: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    # sha256 over the base's tensors (fedmeki_core/models/base_folder.py); the client fills it in from its copy.
    fingerprint: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    lora: LoraSpec | None = None
    heads: tuple[str, ...] = Field(default=(), max_length=64)  # fnmatch patterns of modules of the base trained whole
    quantization: Literal["none", "4bit"] = "none"  # 4bit: QLoRA through bitsandbytes, CUDA silos only

    @field_validator("heads")
    @classmethod
    def _head_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _module_names(value, _MODULE_PATTERN)

    @model_validator(mode="after")
    def _pretrained_rules(self, info: ValidationInfo) -> ModelSpec:
        if reading_stored(info):
            return self
        from fedmeki_core.architectures import PRETRAINED_ARCHITECTURES

        if self.pretrained is None:
            if self.architecture in PRETRAINED_ARCHITECTURES:
                raise field_error("pretrained", f"architecture {self.architecture} needs a pretrained base's name")
            if self.lora is not None or self.heads or self.fingerprint or self.quantization != "none":
                raise field_error("pretrained", "lora, heads, fingerprint and quantization need a pretrained base")
            return self
        if self.architecture not in PRETRAINED_ARCHITECTURES:
            known = " or ".join(sorted(PRETRAINED_ARCHITECTURES))
            raise field_error("architecture", f"a pretrained base is loaded as {known}, not {self.architecture}")
        if self.lora is None and not self.heads:
            raise field_error("lora", "nothing of the base would train: give lora adapters or heads")
        if self.quantization == "4bit" and self.lora is None:
            raise field_error("quantization", "4bit (QLoRA) trains adapters on the quantised base: give lora")
        return self

    @model_validator(mode="after")
    def _known_architecture(self, info: ValidationInfo) -> ModelSpec:
        if reading_stored(info):
            return self
        from fedmeki_core.architectures import (
            ARCHITECTURES,
            CONFIG_RANGES,
            DIVIDES,
            MAX_PARAMETERS,
            estimated_parameters,
        )

        if self.architecture not in ARCHITECTURES:
            raise field_error(
                "architecture",
                f"unknown architecture {shown(self.architecture)}; known: {', '.join(sorted(ARCHITECTURES))}",
            )
        defaults = ARCHITECTURES[self.architecture]
        unknown = sorted(self.config.keys() - defaults.keys())
        if unknown:
            raise field_error(f"config.{unknown[0]}", f"unknown setting for {self.architecture}")
        for key, value in self.config.items():
            expected = type(defaults[key])
            if not has_type_of(value, defaults[key]):
                raise field_error(f"config.{key}", f"must be {expected.__name__}, got {shown(value)}")
            if not submitting(info):
                if value < 0 or (expected is int and value == 0):
                    raise field_error(f"config.{key}", "must be positive")
                continue
            low, high = CONFIG_RANGES[key]
            if key == "dropout" and not 0 <= value < 1:
                raise field_error("config.dropout", f"must lie in [0, 1), got {shown(value)}")
            if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
                raise field_error(f"config.{key}", f"must lie in [{low:g}, {high:g}], got {shown(value)}")
        if not submitting(info):
            return self
        config = {**defaults, **self.config}
        for divisor, dividend in DIVIDES:
            if divisor in config and config[dividend] % config[divisor]:
                raise field_error(
                    f"config.{divisor}", f"{config[divisor]} does not divide {dividend} {config[dividend]}"
                )
        if (count := estimated_parameters(self.architecture, config)) > MAX_PARAMETERS:
            raise field_error("config", f"a model of about {count:,} parameters is over the cap of {MAX_PARAMETERS:,}")
        return self
