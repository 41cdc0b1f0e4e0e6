"""Domain values shared by the coordinator and the clients: job and round states, summaries, events.

States are plain string enums; the transitions allowed between them live in the coordinator's scheduler.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from fedmeki_core.jobspec import JobSpec
from fedmeki_core.wire import TensorSpec


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


class RoundState(enum.StrEnum):
    OPEN = "open"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    COMMITTED = "committed"
    FAILED = "failed"


class RoundKind(enum.StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    INJECT = "inject"


class RelayAction(enum.StrEnum):
    """A silo's next step in a cyclic secure-aggregation round's ring (coordinator/cyclic.py)."""

    WAIT = "wait"  # the hop before this silo's turn has not arrived yet
    START = "start"  # the initiator: upload hop 1, its encrypted weighted delta plus its mask
    ADD = "add"  # download hop - 1, add the encrypted weighted delta, upload hop
    UNMASK = "unmask"  # the initiator: download hop K, remove the mask, upload hop K+1
    DONE = "done"  # nothing left for this silo in the round


@dataclass(frozen=True)
class CheckpointInfo:
    job_id: str
    round: int
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class RelayStep:
    """What a silo does next in a cyclic round's ring: `action`, uploading `hop`; `source` is the hop it downloads
    first (ADD, UNMASK), named by its round, size and sha256."""

    action: RelayAction
    hop: int
    position: int  # in the ring; 0 is the round's initiator
    silos: int
    source: CheckpointInfo | None = None


@dataclass(frozen=True)
class SiloResult:
    """One silo's accepted result of a round: the metrics it reported on its own data, and how many samples."""

    silo: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundSummary:
    number: int
    kind: RoundKind
    state: RoundState
    selected_silos: tuple[str, ...] = ()
    reported_silos: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    opened_at: datetime | None = None
    closed_at: datetime | None = None
    silo_results: tuple[SiloResult, ...] = ()  # by silo name; `metrics` is their sample-weighted mean
    eligible_silos: tuple[str, ...] = ()  # a job's open round, in its status: the silos it could select now


@dataclass(frozen=True)
class JobStatus:
    id: str
    spec: JobSpec
    state: JobState
    reason: str
    current_round: int
    rounds: tuple[RoundSummary, ...]
    created_at: datetime
    updated_at: datetime
    latest_checkpoint: CheckpointInfo | None
    injections: tuple[RoundSummary, ...] = ()  # the injection stage's results, by checkpoint round
    evaluations: tuple[RoundSummary, ...] = ()  # the evaluator silo's scores, by checkpoint round


@dataclass(frozen=True)
class RoundTask:
    """A round's work for one silo, as NextTask hands it out."""

    job_id: str
    round: int
    kind: RoundKind
    spec: JobSpec
    checkpoint: CheckpointInfo  # the global model to start from (train) or to evaluate
    manifest: list[TensorSpec]
    deadline_seconds: float


@dataclass(frozen=True)
class UploadProgress:
    silo: str
    round: int
    received_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class UpdateAccepted:
    silo: str
    round: int
    num_samples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class UpdateReceipt:
    """What the coordinator holds of an accepted update: its size and digest (the upload's receipt)."""

    size_bytes: int
    sha256: str


JobEvent = JobStatus | RoundSummary | UploadProgress | UpdateAccepted
