"""Job specs between protobuf messages and domain values, both ways (the other messages: `convert`)."""

from __future__ import annotations

from typing import Any, Literal

from google.protobuf import json_format, struct_pb2

from fedmeki_core.errors import InvalidJobSpecError
from fedmeki_core.jobspec import JobSpec, PrivacySpec, parse_job_spec
from fedmeki_core.model_spec import ModelSpec
from fedmeki_core.proto.v1 import common_pb2


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def _from_struct(message: struct_pb2.Struct, field: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json_format.MessageToDict(message)
    except ValueError:  # a NaN or an infinity, which JSON cannot hold
        raise InvalidJobSpecError(field, "every number must be finite") from None
    return _integral(data)


def _integral(data: dict[str, Any]) -> dict[str, Any]:
    """Struct numbers are doubles: give integral values back their int type (e.g. hidden_size: 32), nested too."""
    return {
        k: int(v) if isinstance(v, float) and v.is_integer() else _integral(v) if isinstance(v, dict) else v
        for k, v in data.items()
    }


def job_spec_to_proto(spec: JobSpec) -> common_pb2.JobSpec:
    return common_pb2.JobSpec(
        name=spec.name,
        task=spec.task,
        model=_model_to_proto(spec.model),
        algorithm=common_pb2.AlgorithmSpec(
            name=spec.algorithm.name,
            local_epochs=spec.algorithm.local_epochs,
            batch_size=spec.algorithm.batch_size,
            learning_rate=spec.algorithm.learning_rate,
            options=_struct(dict(spec.algorithm.options)),
            personal=list(spec.algorithm.personal),
        ),
        rounds=spec.rounds,
        min_silos=spec.min_silos,
        round_deadline_seconds=spec.round_deadline_seconds,
        silos=list(spec.silos),
        seed=spec.seed,
        delta_encoding=spec.delta_encoding,
        int8_block_size=spec.int8_block_size,
        topk_fraction=spec.topk_fraction,
        downloads=spec.downloads,
        privacy=_privacy_to_proto(spec.privacy),
        injection=None if spec.injection is None else common_pb2.InjectionSpec(**spec.injection.model_dump()),
        statistics=None if spec.statistics is None else _struct(spec.statistics.model_dump(mode="json")),
        normalise=None if spec.normalise is None else _struct(spec.normalise.model_dump(mode="json")),
        evaluation=None if spec.evaluation is None else _struct(spec.evaluation.model_dump(mode="json")),
    )


def _model_to_proto(model: ModelSpec) -> common_pb2.ModelSpec:
    message = common_pb2.ModelSpec(
        architecture=model.architecture,
        config=_struct(dict(model.config)),
        pretrained=model.pretrained or "",
        fingerprint=model.fingerprint,
        heads=list(model.heads),
        quantization=model.quantization,
    )
    if model.lora is not None:
        message.lora.CopyFrom(common_pb2.LoraSpec(**model.lora.model_dump()))
    return message


def _model_from_proto(message: common_pb2.ModelSpec) -> dict[str, Any]:
    model: dict[str, Any] = {"config": _from_struct(message.config, "model.config"), "heads": tuple(message.heads)}
    for key in ("architecture", "pretrained", "fingerprint", "quantization"):
        if value := getattr(message, key):
            model[key] = value
    if message.HasField("lora"):
        lora = message.lora
        model["lora"] = {"target_modules": tuple(lora.target_modules), "dropout": lora.dropout}
        for key in ("rank", "alpha"):
            if value := getattr(lora, key):
                model["lora"][key] = value
    return model


def _privacy_to_proto(privacy: PrivacySpec) -> common_pb2.PrivacySpec:
    message = common_pb2.PrivacySpec(
        secure_aggregation=privacy.secure_aggregation,
        ckks_context_sha256=privacy.ckks_context_sha256,
        ckks_max_norm=privacy.ckks_max_norm,
    )
    if privacy.dp is not None:
        dp = privacy.dp
        message.dp.CopyFrom(
            common_pb2.DifferentialPrivacy(
                mode=dp.mode, clip_norm=dp.clip_norm, noise_multiplier=dp.noise_multiplier, delta=dp.delta
            )
        )
    return message


def job_spec_from_proto(message: common_pb2.JobSpec, submission: bool = False) -> JobSpec:
    """Validate a spec that came over the wire; unset numbers fall back to the defaults. A new job's (`submission`)
    meets every bound; a stored job's, as the coordinator sends it back, is read as it was stored."""
    data: dict[str, Any] = {"name": message.name, "task": message.task, "rounds": message.rounds}
    if message.HasField("model"):
        data["model"] = _model_from_proto(message.model)
    if message.HasField("algorithm"):
        algorithm: dict[str, Any] = {
            "options": _from_struct(message.algorithm.options, "algorithm.options"),
            "personal": list(message.algorithm.personal),
        }
        for key in ("name", "local_epochs", "batch_size", "learning_rate"):
            if value := getattr(message.algorithm, key):
                algorithm[key] = value
        data["algorithm"] = algorithm
    if message.min_silos:
        data["min_silos"] = message.min_silos
    if message.round_deadline_seconds:
        data["round_deadline_seconds"] = message.round_deadline_seconds
    data["silos"] = tuple(message.silos)
    data["seed"] = message.seed
    if message.delta_encoding:
        data["delta_encoding"] = message.delta_encoding
    if message.int8_block_size:
        data["int8_block_size"] = message.int8_block_size
    if message.topk_fraction:
        data["topk_fraction"] = message.topk_fraction
    if message.downloads:
        data["downloads"] = message.downloads
    privacy: dict[str, Any] = {}
    if message.privacy.HasField("dp"):
        dp = message.privacy.dp
        privacy["dp"] = {
            "mode": dp.mode,
            "clip_norm": dp.clip_norm,
            "noise_multiplier": dp.noise_multiplier,
            "delta": dp.delta or 1e-5,
        }
    for key in ("secure_aggregation", "ckks_context_sha256", "ckks_max_norm"):
        if value := getattr(message.privacy, key):
            privacy[key] = value
    if privacy:
        data["privacy"] = privacy
    if message.HasField("injection"):
        fields = common_pb2.InjectionSpec.DESCRIPTOR.fields
        data["injection"] = {
            f.name: getattr(message.injection, f.name) for f in fields if getattr(message.injection, f.name)
        }
    structs: tuple[Literal["statistics", "normalise", "evaluation"], ...] = ("statistics", "normalise", "evaluation")
    for key in structs:
        if message.HasField(key):
            data[key] = _from_struct(getattr(message, key), key)
    return parse_job_spec(data, submission)
