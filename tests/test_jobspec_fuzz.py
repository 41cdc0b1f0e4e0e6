"""Hypothesis over every field of the job spec: each case is refused naming a field, or accepted and usable.

Most cases run at the spec level (no server): a valid spec with one to three fields set to hostile values (huge,
non-finite, negative, of the wrong type, long or control-character text). A refusal must be InvalidJobSpecError,
one line, naming a field the mutation touched (or one a cross-field rule ties to it); an accepted spec must survive
the protobuf round trip and its model must build on the meta device within the parameter cap. A handful of cases
go through a real coordinator as protobuf: INVALID_ARGUMENT naming the field, or a job; never INTERNAL.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.server import Coordinator
from fedmeki_core import convert_spec
from fedmeki_core.architectures import ARCHITECTURES, MAX_PARAMETERS, estimated_parameters
from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.proto.v1 import common_pb2
from tests.conftest import address, enroll
from tests.silo_wire import RawSilo, submit_raw, weights_bytes

BASE: dict[str, Any] = {"name": "fuzz", "task": "synthetic-vitals", "rounds": 2}
CONFIG_KEYS = sorted({key for defaults in ARCHITECTURES.values() for key in defaults})
FIELDS = [
    "name",
    "task",
    "rounds",
    "min_silos",
    "round_deadline_seconds",
    "silos",
    "seed",
    "delta_encoding",
    "model.architecture",
    *(f"model.config.{key}" for key in CONFIG_KEYS),
    "algorithm.name",
    "algorithm.local_epochs",
    "algorithm.batch_size",
    "algorithm.learning_rate",
    "algorithm.personal",
    *(
        f"algorithm.options.{key}"
        for key in ("weighted", "server_learning_rate", "optimizer", "mu", "momentum", "tau", "max_update_norm")
    ),
    "algorithm.options.max_abs_value",
    "algorithm.options.max_silo_weight",
    "algorithm.options.robust.method",
    "algorithm.options.robust.clip_norm",
    "algorithm.options.robust.trim_fraction",
    "algorithm.options.robust.byzantine",
    "privacy.secure_aggregation",
    "privacy.ckks_context_sha256",
    "privacy.ckks_max_norm",
    "privacy.dp.mode",
    "privacy.dp.clip_norm",
    "privacy.dp.noise_multiplier",
    "privacy.dp.delta",
    *(
        f"injection.{key}"
        for key in (
            "language_model",
            "adapter",
            "lora_rank",
            "lora_alpha",
            "experts",
            "top_k",
            "modality_tokens",
            "max_answer_tokens",
            "epochs",
            "batch_size",
            "learning_rate",
            "deadline_seconds",
            "federated",
            "pretrained",
            "fingerprint",
        )
    ),
    "colour",  # not a field at all
]
# Fields whose value a rule checks against another's: a mutation of the first may be refused naming the second.
RELATED = {
    "task": {"model", "injection"},
    "model": {"injection"},
    "privacy": {"min_silos", "delta_encoding", "algorithm"},
    "algorithm": {"privacy"},
    "silos": {"min_silos"},
    "delta_encoding": {"privacy"},
    "injection": {"model", "task"},
}
NUMBERS = st.one_of(
    st.sampled_from([0, -1, 1, 2, 3, 7, 33, 1000, 65536, 10**6, 2**31, 2**63, -(2**63), 10**5000]),
    st.sampled_from([0.0, -0.0, 0.5, 0.999, 1.0, 2.0, -1e-9, 1e-300, 3.0e38, 1e39, 1e300, 1e9]),
    st.sampled_from([math.inf, -math.inf, math.nan]),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXTS = st.one_of(
    st.sampled_from(["", "x" * 5000, "a\x00b", "²", "\x1b[2J", "line\nbreak", "fedavg", "ckks", "central", "lora"]),
    st.text(max_size=40),
)
VALUES = st.one_of(
    NUMBERS,
    TEXTS,
    st.booleans(),
    st.none(),
    st.lists(st.one_of(TEXTS, NUMBERS), max_size=3),
    st.dictionaries(st.sampled_from(["method", "x", "mode"]), st.one_of(TEXTS, NUMBERS), max_size=2),
)


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = spec
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 0.5} if part == "dp" else {}
            node[part] = child
        node = child
    node[last] = value


def _mutated(mutations: list[tuple[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = {**BASE}
    for path, value in mutations:
        if path.startswith("injection.") or path == "model.config.image_size":  # suites only: a coherent base
            spec.update({"task": "fedmeki", "model": {"architecture": "fedmeki-encoders-tiny"}})
        _set(spec, path, value)
    return spec


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(FIELDS), VALUES), min_size=1, max_size=3))
def test_every_spec_is_refused_naming_a_field_or_accepted_and_usable(mutations: list[tuple[str, Any]]) -> None:
    try:
        spec = parse_job_spec(_mutated(mutations))
    except InvalidJobSpecError as exc:
        touched = {path.split(".")[0] for path, _ in mutations}
        allowed = touched | {related for top in touched for related in RELATED.get(top, ())}
        assert exc.field.split(".")[0] in allowed, (exc.message, mutations)
        assert "\n" not in exc.message and len(exc.message) <= 1000, exc.message
        return
    assert spec == convert_spec.job_spec_from_proto(convert_spec.job_spec_to_proto(spec), submission=True)
    assert estimated_parameters(spec.model.architecture, spec.model.config) <= MAX_PARAMETERS
    from fedmeki_core.models.build import expected_initial_manifest

    try:
        assert expected_initial_manifest(spec)  # built on the meta device: nothing allocated, whatever was asked
    except InvalidJobSpecError as exc:  # e.g. personal patterns that match nothing: still a named field
        assert exc.field.startswith("algorithm.personal"), exc.message


def _proto(values: dict[str, Any]) -> common_pb2.JobSpec:
    config = struct_pb2.Struct()
    config.update(values.pop("config", {}))
    return common_pb2.JobSpec(
        name=values.get("name", "fuzz"),
        task="synthetic-vitals",
        rounds=values.get("rounds", 1),
        min_silos=1,
        round_deadline_seconds=values.get("round_deadline_seconds", 60.0),
        seed=values.get("seed", 0),
        model=common_pb2.ModelSpec(architecture="tiny-transformer", config=config),
        algorithm=common_pb2.AlgorithmSpec(name="fedavg", learning_rate=values.get("learning_rate", 0.001)),
    )


WIRE = st.fixed_dictionaries(
    {},
    optional={
        "name": TEXTS,
        "rounds": st.sampled_from([0, -5, 1, 3, 2**31 - 1]),
        "round_deadline_seconds": st.sampled_from([math.inf, math.nan, 1e300, -1.0, 30.0, 604801.0]),
        "seed": st.sampled_from([-1, 0, 2**63 - 1]),
        "learning_rate": st.sampled_from([math.inf, math.nan, 1e300, -0.1, 0.01]),
        "config": st.dictionaries(
            st.sampled_from(["hidden_size", "num_heads", "num_layers", "dropout", "intermediate_size", "x"]),
            st.one_of(st.sampled_from([1e300, math.inf, math.nan, -1.0, 0.5, 2.0, 3.0, 16.0, 1e6]), TEXTS),
            max_size=3,
        ),
    },
)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(values=WIRE)
def test_the_coordinator_answers_every_spec_with_a_job_or_invalid_argument(
    coordinator: Coordinator, values: dict[str, Any]
) -> None:
    if not coordinator.registry.list():  # the first example enrolls the silo a job needs
        RawSilo(address(coordinator), enroll(coordinator, "fuzz-silo")).poll()
    try:
        submit_raw(address(coordinator), _proto(dict(values)), weights_bytes())
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details(), values)
        assert str(exc.details()).startswith("invalid job spec: "), exc.details()
        assert "\n" not in str(exc.details())
