"""JobSpec validation names the offending field; specs survive YAML and protobuf round trips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedmeki_core import convert_spec
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
        ({"dropout": 2.0}, "model.config.dropout"),
        ({"dropout": 1.0}, "model.config.dropout"),
        ({"dropout": float("nan")}, "model.config.dropout"),
        ({"hidden_size": 65536}, "model.config.hidden_size"),
        ({"hidden_size": 1_000_000}, "model.config.hidden_size"),
        ({"hidden_size": 10**5000}, "model.config.hidden_size"),
        ({"num_heads": 3}, "model.config.num_heads"),  # does not divide hidden_size 32
        ({"hidden_size": 8192, "num_heads": 8, "num_layers": 96, "intermediate_size": 65536}, "model.config"),
        ({"num_heads": True}, "model.config.num_heads"),
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
        ({"round_deadline_seconds": float("inf")}, "round_deadline_seconds"),
        ({"round_deadline_seconds": 1e300}, "round_deadline_seconds"),
        ({"round_deadline_seconds": float("nan")}, "round_deadline_seconds"),
        ({"name": "clear\x1b[2J\x1b[Hscreen"}, "name"),
        ({"name": "forged\n2026-01-01 INFO job done"}, "name"),
        ({"name": "nul\x00byte"}, "name"),
        ({"silos": ["a\rb"]}, "silos"),
        ({"seed": -1}, "seed"),
        ({"algorithm": {"options": {"server_learning_rate": float("inf")}}}, "algorithm.options"),
        ({"algorithm": {"options": {"max_update_norm": 0}}}, "algorithm.options"),
        ({"algorithm": {"options": {"max_update_norm": 10**400}}}, "algorithm.options"),  # too large for a float
        ({"algorithm": {"options": {"max_silo_weight": 2}}}, "algorithm.options"),
        (
            {"algorithm": {"options": {"max_silo_weight": 0.5, "robust": {"method": "median"}}}},
            "algorithm.options.max_silo_weight",
        ),
        (
            {"min_silos": 3, "privacy": {"secure_aggregation": "ckks"}, "algorithm": {"options": {"max_abs_value": 1}}},
            "algorithm.options",
        ),
        ({"injection": {"deadline_seconds": float("inf")}, "task": "fedmeki"}, "injection.deadline_seconds"),
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
    again = convert_spec.job_spec_from_proto(convert_spec.job_spec_to_proto(spec))
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
    assert convert_spec.job_spec_from_proto(convert_spec.job_spec_to_proto(spec)) == spec
    assert convert_spec.job_spec_from_proto(convert_spec.job_spec_to_proto(parse_job_spec(BASE))).privacy.dp is None


def test_a_missing_field_beside_a_near_miss_suggests_it() -> None:
    with pytest.raises(InvalidJobSpecError) as info:
        parse_job_spec({"name": "x", "task": "synthetic-vitals", "round": 3})
    expected = "rounds: Field required (the spec has 'round': did you mean 'rounds'?)"
    assert info.value.message == f"invalid job spec: {expected}"


@pytest.mark.parametrize(
    ("dp", "field"),
    [
        ({"noise_multiplier": 1e39}, "privacy.dp.noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "privacy.dp.noise_multiplier"),
        ({"clip_norm": 1e300}, "privacy.dp.clip_norm"),
    ],
)
def test_central_noise_is_bounded(dp: dict[str, Any], field: str) -> None:
    settings = {"mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0, **dp}
    with pytest.raises(InvalidJobSpecError) as info:
        parse_job_spec({**BASE, "privacy": {"dp": settings}})
    assert info.value.field == field


@pytest.mark.parametrize(
    ("architecture", "task", "config"),
    [
        ("tiny-transformer", "synthetic-vitals", {}),
        ("tiny-transformer", "synthetic-vitals", {"hidden_size": 256, "num_heads": 4, "intermediate_size": 1024}),
        ("fedmeki-encoders", "fedmeki", {}),
        ("fedmeki-encoders-tiny", "fedmeki", {"image_hidden": 64, "ehr_width": 64, "ecg_channels": 32}),
        ("ct-classifier", "ct-covid", {"channels": 16, "depth": 4}),
        ("unet", "ct-infection-segmentation", {"levels": 4}),
        ("tabular-logistic", "tabular", {"num_features": 30}),
        ("tabular-mlp", "tabular-multiclass", {"num_features": 13, "num_classes": 3, "num_layers": 3}),
    ],
)
def test_the_parameter_estimate_matches_the_model(architecture: str, task: str, config: dict[str, Any]) -> None:
    """The cap's estimate, from the numbers alone, is within 10% of the model's count (on the meta device)."""
    import torch

    from fedmeki_core.architectures import estimated_parameters
    from fedmeki_core.models.build import build_model

    spec = parse_job_spec({**BASE, "task": task, "model": {"architecture": architecture, "config": config}})
    with torch.device("meta"):
        count = sum(p.numel() for p in build_model(spec.model, task).parameters())
    assert 0.9 * count <= estimated_parameters(architecture, config) <= 1.1 * count


def test_a_yaml_number_too_long_to_parse_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: j\ntask: synthetic-vitals\nrounds: 1\nmodel: {{config: {{hidden_size: {'9' * 5000}}}}}\n")
    with pytest.raises(InvalidJobSpecError, match="cannot read"):
        load_job_spec(path)


def test_a_stored_spec_loads_without_the_bounds_that_came_after_it() -> None:
    """A job stored before a bound existed is still listed and shown: only a new job must meet every bound."""
    old = {**BASE, "name": "old\x1b[1mjob", "round_deadline_seconds": 1e9, "model": {"config": {"dropout": 2.0}}}
    spec = parse_job_spec(old, submission=False)
    assert (
        spec.round_deadline_seconds == 1e9
        and convert_spec.job_spec_from_proto(convert_spec.job_spec_to_proto(spec)) == spec
    )
    with pytest.raises(InvalidJobSpecError):
        parse_job_spec(old)
    with pytest.raises(InvalidJobSpecError):
        convert_spec.job_spec_from_proto(convert_spec.job_spec_to_proto(spec), submission=True)


def test_every_architecture_key_has_a_range_and_every_architecture_an_estimate() -> None:
    from fedmeki_core.architectures import ARCHITECTURES, CONFIG_RANGES, PRETRAINED_ARCHITECTURES, estimated_parameters

    for architecture, defaults in ARCHITECTURES.items():
        assert defaults.keys() <= CONFIG_RANGES.keys(), architecture
        # A pretrained base stays at the silos: it counts nothing against the cap.
        assert (estimated_parameters(architecture, {}) > 0) == (architecture not in PRETRAINED_ARCHITECTURES)
