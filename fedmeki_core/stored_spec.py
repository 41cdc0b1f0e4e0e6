"""A stored job spec: written with a version, read leniently, never re-validated against today's registries.

A spec is validated strictly once, at submission (`parse_job_spec`). The coordinator stores it with the version of
its layout (`SPEC_VERSION`) and reads it back with `read_stored_spec`, which must accept whatever an earlier release
stored, so that a release which renames, removes or tightens an option leaves old jobs readable (listed, shown,
resumed). The rules a release follows:

- renaming a field or an algorithm option: bump `SPEC_VERSION` and add `(old, new)` dotted paths under the new
  version in `RENAMED`; a spec stored at an older version is read with its keys renamed;
- removing one: nothing; a field no model has, or an option the job's algorithm no longer has, is dropped on read;
- tightening a bound: in `spec_rules.SUBMISSION_BOUNDS` (checked at submission only), never in a `Field`
  constraint, which reading still checks. Reading runs no model validator and no registry check (`STORED`).
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from fedmeki_core.algorithms import ALGORITHMS
from fedmeki_core.jobspec import JobSpec
from fedmeki_core.spec_rules import STORED

SPEC_VERSION = 1  # 0: rows stored before specs carried a version (the same layout as 1)
VERSION_KEY = "spec_version"
# version -> the (old, new) dotted paths renamed in it, e.g. {2: (("algorithm.options.mu", "algorithm.options.m"),)}
RENAMED: Mapping[int, tuple[tuple[str, str], ...]] = {}


def stored_spec(spec: JobSpec) -> dict[str, Any]:
    """What the coordinator stores of a submitted (validated) spec."""
    return {**spec.model_dump(mode="json"), VERSION_KEY: SPEC_VERSION}


def read_stored_spec(data: Mapping[str, Any], renamed: Mapping[int, tuple[tuple[str, str], ...]] = RENAMED) -> JobSpec:
    """The spec a job was submitted with, from what any release stored of it (see the module's rules)."""
    spec = copy.deepcopy(dict(data))
    version = spec.pop(VERSION_KEY, 0)
    for later in sorted(v for v in renamed if v > version):
        for old, new in renamed[later]:
            _rename(spec, old.split("."), new.split("."))
    spec = _known_fields(JobSpec, spec)
    algorithm = spec.get("algorithm")
    if isinstance(algorithm, dict) and isinstance(options := algorithm.get("options"), dict):
        entry = ALGORITHMS.get(str(algorithm.get("name", "fedavg")))
        if entry is not None:  # a removed algorithm keeps its options: its job shows, and cannot run anyway
            algorithm["options"] = {k: v for k, v in options.items() if k in entry.option_names}
    return JobSpec.model_validate(spec, context={STORED: True})


def _rename(spec: dict[str, Any], old: list[str], new: list[str]) -> None:
    """Move the value at dotted path `old` to `new` (unless a value is there already)."""
    node: Any = spec
    for part in old[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or old[-1] not in node:
        return
    value = node.pop(old[-1])
    node = spec
    for part in new[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    node.setdefault(new[-1], value)


def _known_fields(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys `model` (and the models nested in it) has no field for: a field a release removed."""
    known: dict[str, Any] = {}
    for key, value in data.items():
        if (field := model.model_fields.get(key)) is None:
            continue
        nested = _nested_model(field.annotation)
        known[key] = _known_fields(nested, value) if nested is not None and isinstance(value, dict) else value
    return known


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (`X` or `X | None`), or None for a plain value."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    for candidate in typing.get_args(annotation) if union else (annotation,):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
