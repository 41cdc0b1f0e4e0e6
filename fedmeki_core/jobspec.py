"""JobSpec: what a researcher asks for, validated once at submission.

Loaded from YAML by the CLI, carried as protobuf on the wire, and checked here: every problem raises
InvalidJobSpecError naming the field.
"""

from __future__ import annotations

import difflib
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedmeki_core.errors import FedmekiError, InvalidJobSpecError
from fedmeki_core.jobspec_evaluation import EvaluationSpec
from fedmeki_core.jobspec_statistics import (
    STATISTICS_ROUNDS,
    NormaliseSpec,
    StatisticsSpec,
    ckks_statistics_error,
    statistics_job_error,
)
from fedmeki_core.model_spec import ModelSpec
from fedmeki_core.option_types import shown
from fedmeki_core.spec_rules import (
    CONTROL_CHARACTERS,
    MAX_DEADLINE_SECONDS,
    MAX_NAME,
    SUBMISSION,
    SUBMISSION_BOUNDS,
    Spec,
    field_error,
    reading_stored,
    submitting,
    text_error,
)

_NO_CKKS = {"secure_aggregation": "none", "ckks_context_sha256": ""}  # a privacy section less its CKKS sum


class AlgorithmSpec(Spec):
    name: str = "fedavg"
    local_epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    learning_rate: float = Field(default=1e-3, gt=0, le=10)
    options: dict[str, Any] = Field(default_factory=dict)
    # Glob patterns (fnmatch) of model tensors each silo keeps to itself: FedBN keeps "*norm*", FedPer/FedRep
    # the heads ("heads.*"). They are not in the checkpoint; every silo trains and evaluates its own.
    personal: list[str] = Field(default_factory=list, max_length=64)

    @field_validator("personal")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not pattern or len(pattern) > 256:
                raise ValueError("each pattern must be 1 to 256 characters")
        return value

    @model_validator(mode="after")
    def _known_algorithm(self, info: ValidationInfo) -> AlgorithmSpec:
        if reading_stored(info):
            return self
        from fedmeki_core.algorithms import get_algorithm

        try:
            entry = get_algorithm(self.name)
        except FedmekiError as exc:
            raise field_error("name", exc.message) from None
        try:
            entry.validate_options(self.options)
        except FedmekiError as exc:
            raise field_error("options", exc.message) from None
        return self


class DifferentialPrivacySpec(Spec):
    mode: Literal["central", "local"]
    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    delta: float = Field(default=1e-5, gt=0, lt=1)


class PrivacySpec(Spec):
    dp: DifferentialPrivacySpec | None = None
    # "ckks": silos encrypt their weighted deltas, the coordinator only adds ciphertexts (fedmeki_core/privacy/he).
    # "cyclic": PPPML-HMI's ring: the encrypted running sum passes silo to silo through the coordinator, masked by
    # a rotating initiator (coordinator/cyclic.py); the same keys, ciphertexts and aggregates as "ckks".
    secure_aggregation: Literal["none", "ckks", "cyclic"] = "none"
    # The fingerprint of the public context submitted with the job; the client fills it in from public.ckks.
    ckks_context_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    # The silos' bound on the L2 norm of the decrypted mean delta: above it the round is aborted.
    ckks_max_norm: float = Field(default=1e6, gt=0)


class InjectionSpec(Spec):
    """FedMEKI's injection stage; defaults are the paper's (LoRA r 8, alpha 32, 12 experts top-2, lr 5e-4)."""

    language_model: Literal["tiny-llama"] = "tiny-llama"  # built from a config; a real LM: `pretrained`
    # A pretrained causal LM the injector holds (its silo.yaml `models`), checked by fingerprint like model.pretrained.
    pretrained: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    fingerprint: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    adapter: Literal["moe-lora", "lora"] = "moe-lora"
    lora_rank: int = Field(default=8, ge=1, le=1024)
    lora_alpha: int = Field(default=32, ge=1)
    experts: int = Field(default=12, ge=1, le=256)
    top_k: int = Field(default=2, ge=1)
    modality_tokens: int = Field(default=8, ge=1, le=1024)
    max_answer_tokens: int = Field(default=12, ge=1, le=1024)
    epochs: int = Field(default=1, ge=1, le=1000)
    batch_size: int = Field(default=16, ge=1, le=65536)
    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    deadline_seconds: float = Field(default=3600.0, gt=0)
    # True: silos train the injection model's trainable part on their own data (no injector, no public data).
    federated: bool = False

    @property
    def deadline(self) -> timedelta:
        """How long an injection may take; a stored job's longer deadline is cut to MAX_DEADLINE_SECONDS."""
        return timedelta(seconds=min(self.deadline_seconds, MAX_DEADLINE_SECONDS))

    @model_validator(mode="after")
    def _top_k_of_experts(self, info: ValidationInfo) -> InjectionSpec:
        if reading_stored(info):
            return self
        if self.top_k > self.experts:
            raise field_error("top_k", f"{self.top_k} is more than the {self.experts} experts")
        if self.fingerprint and self.pretrained is None:
            raise field_error("fingerprint", "needs a base named in injection.pretrained")
        if self.pretrained is not None and self.federated:
            raise field_error("pretrained", "a named base is for the injector; federated injection uses tiny-llama")
        return self


class JobSpec(Spec):
    name: str = Field(min_length=1, max_length=200)
    task: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    rounds: int = Field(ge=1, le=100_000)
    min_silos: int = Field(default=1, ge=1)
    round_deadline_seconds: float = Field(default=600.0, gt=0)
    silos: tuple[str, ...] = ()
    seed: int = 0
    # int8: blockwise, one float32 scale per int8_block_size values; topk: the topk_fraction largest entries.
    # Both keep what they did not send at the silo and add it to the next round's delta (error feedback).
    delta_encoding: Literal["float32", "bfloat16", "float16", "int8", "topk"] = "float32"
    int8_block_size: int = Field(default=128, ge=64, le=256)
    topk_fraction: float = Field(default=0.01, ge=0.0001, le=0.5)
    # delta: each round's global model goes to a silo holding the previous one as the change from it, in the job's
    # lossy encoding (int8, topk), and the committed model is what that change rebuilds (docs/architecture.md).
    downloads: Literal["full", "delta"] = "full"
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    injection: InjectionSpec | None = None
    statistics: StatisticsSpec | None = None  # a federated statistics job (fedmeki_core/statistics.py)
    normalise: NormaliseSpec | None = None  # standardise the features with a statistics job's figures
    evaluation: EvaluationSpec | None = None  # an evaluator silo scores every committed checkpoint

    @model_validator(mode="before")
    @classmethod
    def _statistics_rounds(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("statistics") is not None and "rounds" not in data:
            return {**data, "rounds": STATISTICS_ROUNDS}
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str, info: ValidationInfo) -> str:
        if reading_stored(info):
            return task
        from fedmeki_core.tasks import SUITES, TASKS

        if task not in TASKS and task not in SUITES:
            known = ", ".join(sorted(TASKS.keys() | SUITES.keys()))
            raise ValueError(f"unknown task or suite {shown(task)}; known: {known}")
        return task

    @model_validator(mode="after")
    def _model_fits_task(self, info: ValidationInfo) -> JobSpec:
        if reading_stored(info):
            return self
        from fedmeki_core.architectures import MODALITIES
        from fedmeki_core.tasks import SUITES, get_task, injection_tasks

        members = SUITES[self.task].tasks if self.task in SUITES else (self.task,)
        if self.statistics is not None:
            modality = "suite" if self.task in SUITES else get_task(self.task).modality
            # Compared with the defaults, not `model_fields_set`: a spec from the wire sets every section.
            given = {
                name
                for name, default in (
                    ("model", ModelSpec()),
                    ("algorithm", AlgorithmSpec()),
                    ("privacy", PrivacySpec()),
                )
                if getattr(self, name) != default
            }
            ckks = self.privacy.secure_aggregation == "ckks"
            if ckks and self.privacy.model_copy(update=_NO_CKKS) == PrivacySpec():
                given -= {"privacy"}  # a CKKS sum of the releases (fedmeki_core/statistics_ckks.py)
            given |= {"injection"} if self.injection is not None else set()
            given |= {"evaluation"} if self.evaluation is not None else set()
            given |= {"delta_encoding"} if self.delta_encoding != "float32" else set()
            error = statistics_job_error(self.rounds, given, modality, self.normalise is not None)
            error = error or (ckks_statistics_error(self.statistics) if ckks else None)
            if error is not None:
                raise field_error(*error)
            return self
        if self.normalise is not None and (self.task in SUITES or get_task(self.task).modality != "table"):
            raise field_error("normalise", f"standardises a table's features, not those of {self.task}")
        if self.task in SUITES and not self.model.architecture.startswith("fedmeki-encoders"):
            raise field_error("model.architecture", f"the {self.task} suite needs fedmeki-encoders(-tiny)")
        for name in members:
            modality = get_task(name).modality
            if modality not in MODALITIES[self.model.architecture]:
                raise field_error("model.architecture", f"{self.model.architecture} cannot take {modality} ({name})")
        if self.injection is not None and not injection_tasks(self.task)[0]:
            raise field_error(
                "injection",
                f"injection needs a suite (e.g. fedmeki) or a training task of one, not {shown(self.task)}",
            )
        if self.injection is not None and not self.model.architecture.startswith("fedmeki-encoders"):
            raise field_error("injection", f"injection takes fedmeki-encoders models, not {self.model.architecture}")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_rules(self, info: ValidationInfo) -> JobSpec:
        if reading_stored(info):
            return self
        mode = self.privacy.secure_aggregation
        if mode != "none":
            if self.min_silos < 3:
                raise field_error(
                    "min_silos",
                    f"privacy.secure_aggregation {mode} needs at least 3, got {self.min_silos} (with 2 silos each "
                    "learns the other's update by subtracting its own from the aggregate)",
                )
            if self.delta_encoding != "float32":
                raise field_error("delta_encoding", f"privacy.secure_aggregation {mode} encrypts float32 deltas")
            if self.evaluation is not None:
                raise field_error("evaluation", f"an evaluator scores plaintext checkpoints; {mode} encrypts them")
        return self

    @model_validator(mode="after")
    def _delta_downloads_need_a_lossy_encoding(self, info: ValidationInfo) -> JobSpec:
        if not reading_stored(info) and self.downloads == "delta" and self.delta_encoding not in ("int8", "topk"):
            raise field_error(
                "downloads",
                "delta downloads need delta_encoding int8 or topk (a delta in a float encoding is as large as the "
                "model or half of it: the full checkpoint is sent)",
            )
        return self

    @model_validator(mode="after")
    def _robust_reads_float_updates(self, info: ValidationInfo) -> JobSpec:
        if reading_stored(info):
            return self
        from fedmeki_core.algorithms.robust import robust_aggregation

        if self.delta_encoding in ("int8", "topk") and robust_aggregation(self.algorithm.options).whole_round:
            raise field_error(
                "delta_encoding", f"{self.delta_encoding} cannot be combined with a whole-round robust aggregation"
            )
        return self

    @model_validator(mode="after")
    def _robust_without_central_dp(self, info: ValidationInfo) -> JobSpec:
        if reading_stored(info):
            return self
        from fedmeki_core.algorithms.robust import robust_aggregation

        dp = self.privacy.dp
        if dp is not None and dp.mode == "central" and robust_aggregation(self.algorithm.options).method != "none":
            raise field_error(
                "algorithm.options.robust",
                "cannot be combined with central differential privacy, whose noise is calibrated to a clipped mean",
            )
        return self

    @property
    def round_deadline(self) -> timedelta:
        """How long a round waits; a stored job's longer deadline (1e300 overflowed a datetime) is cut to a week."""
        return timedelta(seconds=min(self.round_deadline_seconds, MAX_DEADLINE_SECONDS))

    @model_validator(mode="after")
    def _submission_bounds(self, info: ValidationInfo) -> JobSpec:
        if reading_stored(info):
            return self
        if not submitting(info):
            return self
        for field, low, high in SUBMISSION_BOUNDS:
            value: Any = self
            for part in field.split("."):
                value = getattr(value, part) if value is not None else None
            if value is not None and not low <= value <= high:
                raise field_error(field, f"must lie in [{low:g}, {high:g}], got {shown(value)}")
        texts = [("name", self.name, MAX_NAME), *(("silos", name, MAX_NAME) for name in self.silos)]
        texts += [("algorithm.personal", pattern, 256) for pattern in self.algorithm.personal]
        for field, text, longest in texts:
            if (error := text_error(field, text, longest)) is not None:
                raise error
        return self

    @model_validator(mode="after")
    def _update_limits_apply(self, info: ValidationInfo) -> JobSpec:
        if reading_stored(info):
            return self
        from fedmeki_core.algorithms.robust import robust_aggregation
        from fedmeki_core.algorithms.update_limits import update_limits

        limits = update_limits(self.algorithm.options)
        if self.privacy.secure_aggregation != "none" and (limits.checks_values or limits.max_silo_weight):
            raise field_error(
                "algorithm.options",
                "max_update_norm, max_abs_value and max_silo_weight cannot apply to encrypted updates "
                f"(privacy.secure_aggregation {self.privacy.secure_aggregation})",
            )
        if limits.max_silo_weight is not None and robust_aggregation(self.algorithm.options).whole_round:
            raise field_error("algorithm.options.max_silo_weight", "median, trimmed_mean and krum ignore weights")
        return self

    @model_validator(mode="after")
    def _enough_listed_silos(self, info: ValidationInfo) -> JobSpec:
        if reading_stored(info):
            return self
        if self.silos and self.min_silos > len(self.silos):
            raise field_error("min_silos", f"{self.min_silos} is more than the {len(self.silos)} silos listed")
        return self


def parse_job_spec(data: dict[str, Any], submission: bool = True) -> JobSpec:
    """Validate a job spec given as plain data; InvalidJobSpecError names the first bad field. A new job's spec
    (`submission`) meets every bound; a stored job's is read without the ones that came after it was stored."""
    try:
        return JobSpec.model_validate(data, context={SUBMISSION: submission})
    except ValidationError as exc:
        error = exc.errors()[0]
        path = [str(part) for part in error["loc"]]
        context = error.get("ctx") or {}
        if error["type"] == "fedmeki_field":
            path.append(context["field"])
        message = CONTROL_CHARACTERS.sub(
            lambda m: repr(m.group())[1:-1], str(error["msg"]).removeprefix("Value error, ")
        ) + _near_miss(exc, error["loc"])
        if len(message) > 500:  # one line a person reads, whatever was quoted
            message = f"{message[:240]} ... {message[-240:]}"
        raise InvalidJobSpecError(".".join(shown(part, 40).strip("'") for part in path) or "spec", message) from None


def _near_miss(exc: ValidationError, loc: tuple[int | str, ...]) -> str:
    """For a missing field, the unknown key beside it that looks like a typo of it (`round:` for `rounds:`)."""
    if exc.errors()[0]["type"] != "missing":
        return ""
    unknown = [str(e["loc"][-1]) for e in exc.errors() if e["type"] == "extra_forbidden" and e["loc"][:-1] == loc[:-1]]
    close = difflib.get_close_matches(str(loc[-1]), unknown, n=1, cutoff=0.6)
    return f" (the spec has {close[0]!r}: did you mean {str(loc[-1])!r}?)" if close else ""


def load_job_spec(path: Path) -> JobSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. an integer of 5,000 digits
        raise InvalidJobSpecError("spec", f"cannot read {path}: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidJobSpecError("spec", f"{path} must hold a mapping")
    return parse_job_spec(data)
