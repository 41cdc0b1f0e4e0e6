"""JobSpec validation names the offending field; specs survive YAML and protobuf round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedmeki_core import convert
from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.jobspec import load_job_spec, parse_job_spec

BASE: dict[str, Any] = {"name": "j", "task": "synthetic-vitals", "rounds": 2}


def test_defaults() -> None:
    spec = parse_job_spec(BASE)
    assert spec.algorithm.name == "fedavg" and spec.min_silos == 1 and spec.model.architecture == "tiny-transformer"
    assert spec.model.config == {} and spec.algorithm.options == {} and spec.silos == ()
    assert spec.algorithm.local_epochs == 1 and spec.delta_encoding == "float32"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"hidden_size": "big"}, "model.config.hidden_size"),
        ({"num_heads": 2.5}, "model.config.num_heads"),
        ({"num_layers": -3}, "model.config.num_layers"),
        ({"dropout": "none"}, "model.config.dropout"),
    ],
)
def test_model_config_values_are_checked(config: dict[str, Any], field: str) -> None:
    """A bad value is caught at submission, not when a silo first builds the model."""
    with pytest.raises(InvalidJobSpecError) as info:
        parse_job_spec({**BASE, "model": {"config": config}})
    assert info.value.field == field


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"task": "nope"}, "task"),
        ({"rounds": 0}, "rounds"),
        ({"algorithm": {"name": "fedmagic"}}, "algorithm.name"),
        ({"algorithm": {"options": {"weighted": "yes"}}}, "algorithm.options"),
        ({"algorithm": {"options": {"momentum": 0.9}}}, "algorithm.options"),
        ({"algorithm": {"learning_rate": 0}}, "algorithm.learning_rate"),
        ({"model": {"architecture": "gpt-9"}}, "model.architecture"),
        ({"model": {"config": {"depth": 3}}}, "model.config.depth"),
        ({"min_silos": 3, "silos": ["a", "b"]}, "min_silos"),
        ({"round_deadline_seconds": -1}, "round_deadline_seconds"),
        ({"colour": "blue"}, "colour"),
        ({"delta_encoding": "int4"}, "delta_encoding"),
        ({"delta_encoding": "int8", "int8_block_size": 512}, "int8_block_size"),
        ({"delta_encoding": "topk", "topk_fraction": 0.9}, "topk_fraction"),
    ],
)
def test_invalid_fields_are_named(change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJobSpecError) as info:
        parse_job_spec({**BASE, **change})
    assert info.value.field == field
    assert str(info.value).startswith(f"invalid job spec: {field}: ")


def test_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: j\ntask: synthetic-vitals\nrounds: 3\nalgorithm: {local_epochs: 2}\n")
    assert load_job_spec(path).algorithm.local_epochs == 2
    path.write_text("- not a mapping\n")
    with pytest.raises(InvalidJobSpecError, match="must hold a mapping"):
        load_job_spec(path)


def test_protobuf_round_trip() -> None:
    spec = parse_job_spec(
        {
            **BASE,
            "silos": ["a", "b"],
            "min_silos": 2,
            "seed": 5,
            "model": {"config": {"hidden_size": 48, "dropout": 0.1}},
            "algorithm": {"learning_rate": 0.01, "options": {"optimizer": "sgd", "weighted": False}},
        }
    )
    again = convert.job_spec_from_proto(convert.job_spec_to_proto(spec))
    assert again == spec
    assert isinstance(again.model.config["hidden_size"], int)


@pytest.mark.parametrize(
    ("dp", "field"),
    [
        ({"mode": "global", "clip_norm": 1.0, "noise_multiplier": 1.0}, "privacy.dp.mode"),
        ({"mode": "central", "clip_norm": 0, "noise_multiplier": 1.0}, "privacy.dp.clip_norm"),
        ({"mode": "local", "clip_norm": 1.0, "noise_multiplier": -1}, "privacy.dp.noise_multiplier"),
        ({"mode": "local", "clip_norm": 1.0, "noise_multiplier": 1, "delta": 1.5}, "privacy.dp.delta"),
    ],
)
def test_differential_privacy_settings_are_checked(dp: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidJobSpecError) as info:
        parse_job_spec({**BASE, "privacy": {"dp": dp}})
    assert info.value.field == field


def test_privacy_survives_the_protobuf_round_trip() -> None:
    spec = parse_job_spec(
        {**BASE, "privacy": {"dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 1.1, "delta": 1e-6}}}
    )
    assert convert.job_spec_from_proto(convert.job_spec_to_proto(spec)) == spec
    assert convert.job_spec_from_proto(convert.job_spec_to_proto(parse_job_spec(BASE))).privacy.dp is None


def test_a_missing_field_beside_a_near_miss_suggests_it() -> None:
    with pytest.raises(InvalidJobSpecError) as info:
        parse_job_spec({"name": "x", "task": "synthetic-vitals", "round": 3})
    expected = "rounds: Field required (the spec has 'round': did you mean 'rounds'?)"
    assert info.value.message == f"invalid job spec: {expected}"
