"""SiloSettings: flags over environment (FEDMEKI_SILO_*) over silo.yaml over defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedmeki_core.settings import load_settings
from fedmeki_core.tasks import TASKS
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
_BASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class DatasetBudget(BaseModel):
    """A dataset's differential-privacy budget: the (epsilon, delta) every job on it may spend together."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0, allow_inf_nan=False)
    delta: float = Field(default=1e-5, gt=0, lt=1)
    require_dp: bool = False  # true: jobs without differential privacy are declined on this dataset


class SiloSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDMEKI_SILO_", extra="forbid")

    coordinator: str = "127.0.0.1:50051"  # with a kit and no coordinator set: the kit's
    kit: Path | None = None  # this silo's startup kit (fedmeki provision): mTLS instead of an enrollment
    work_dir: Path = Path("fedmeki-silo")
    device: str = "auto"
    # Several devices: each training round runs as a torch.distributed job, one process per device (a list such as
    # [cuda:0, cuda:1], or cuda:all; [cpu, cpu] runs two CPU ranks). Evaluation and injection stay on `device`.
    devices: list[str] | Literal["cuda:all"] | None = Field(default=None, min_length=1, max_length=64)
    distributed_timeout_seconds: float = Field(default=900.0, gt=0, le=86400)  # a rank silent this long fails
    # With several devices, `fsdp` shards a pretrained base's parameters across the ranks (silo_agent/sharding.py):
    # for a base that does not fit one device. `none` keeps a whole copy on each rank (data-parallel).
    sharding: Literal["none", "fsdp"] = "none"
    data: dict[str, Path] = Field(default_factory=dict)  # task name -> dataset file
    # Pretrained bases this hospital holds: the name a job gives (model.pretrained) -> a save_pretrained folder.
    models: dict[str, Path] = Field(default_factory=dict, max_length=1024)
    # This silo's budget for jobs on them: a larger LoRA rank or a longer sequence (causal-lm max_length) is declined.
    max_lora_rank: int | None = Field(default=None, ge=1, le=1 << 16)
    max_sequence_length: int | None = Field(default=None, ge=1, le=1 << 24)
    # The most a job may ask of this silo, checked on its model built on the meta device before anything is
    # downloaded or allocated (silo_agent/resources.py); a job over one is declined with the figures. Parameters:
    # trained and frozen; checkpoint bytes: the global model the silo downloads and loads whole; device memory: an
    # estimate, the model's weights and buffers plus a gradient and two Adam moments (float32) per trained parameter.
    max_parameters: int = Field(default=500_000_000, ge=1, le=1 << 40)
    max_checkpoint_bytes: int = Field(default=4 << 30, ge=1, le=1 << 50)
    max_device_memory_bytes: int = Field(default=16 << 30, ge=1, le=1 << 50)
    poll_wait_seconds: float = Field(default=20.0, ge=0, le=300)
    chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1024, le=64 << 20)
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    # For this silo's GPU: samples per forward pass (gradients accumulate to the job's batch size) and autocast.
    micro_batch_size: int | None = Field(default=None, ge=1)
    mixed_precision: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 where the GPU has it, else fp16
    retry_max_seconds: float = Field(default=30.0, gt=0)
    # A (job, round) whose training or evaluation fails this many times here (an exception, out of memory) is
    # given up and declined with the last error (AbortRound), instead of being tried again for ever.
    max_task_failures: int = Field(default=3, ge=1, le=100)
    # HTTP/2 pings after this many idle seconds; no answer within the timeout: the connection is dead (a network
    # that silently stopped forwarding), calls fail and are retried on a new one. Not below the coordinator's
    # keepalive_min_client_seconds, which refuses clients that ping more often.
    keepalive_seconds: float = Field(default=60.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=20.0, gt=0)
    metrics_address: str | None = None  # HOST:PORT of the agent's Prometheus endpoint (plain HTTP); none: off
    # The federation's secret.ckks (fedmeki he keygen), for jobs with privacy.secure_aggregation ckks.
    ckks_secret_context: Path | None = None
    # Dataset (a task name under `data`) -> its DP budget; the agent's ledger charges every DP job's rounds to it.
    privacy_budget: dict[str, DatasetBudget] = Field(default_factory=dict)
    # Statistics jobs: a feature or histogram bin with fewer rows here is never released, whatever the job asks.
    min_cell_count: int = Field(default=10, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            bad = [device for device in value if device == "auto" or not _DEVICE.match(device)]
            if bad:
                raise ValueError(f"devices: each is cpu, cuda or cuda:N, got {bad[0][:40]!r}")
        return value

    @field_validator("data")
    @classmethod
    def _known_tasks(cls, value: dict[str, Path]) -> dict[str, Path]:
        unknown = sorted(value.keys() - TASKS.keys())
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}; known tasks: {', '.join(sorted(TASKS))}")
        return value

    @field_validator("privacy_budget")
    @classmethod
    def _budgets_of_held_data(cls, value: dict[str, DatasetBudget], info: ValidationInfo) -> dict[str, DatasetBudget]:
        unknown = sorted(value.keys() - info.data.get("data", {}).keys())
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a dataset under data")
        return value

    @field_validator("models")
    @classmethod
    def _base_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if not _BASE_NAME.fullmatch(name):
                raise ValueError(f"model name {name[:80]!r}: letters, digits and _ . - (at most 128)")
        return value

    @classmethod
    def from_yaml(cls, path: Path | None, **overrides: Any) -> SiloSettings:
        """silo.yaml values (none without a path), then the environment, then `overrides` that are not None.

        Raises InvalidInputError naming the first bad setting.
        """
        return load_settings(cls, path, overrides)
