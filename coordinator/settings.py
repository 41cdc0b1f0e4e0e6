"""CoordinatorSettings: flags over environment (FEDMEKI_COORDINATOR_*) over a YAML file over defaults."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedmeki_core.settings import load_settings
from fedmeki_core.transport_options import STREAM_WINDOW_BYTES
from fedmeki_core.wire import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_HEADER_BYTES


def default_sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'coordinator.db').resolve()}"


@dataclass(frozen=True)
class SchedulerSettings:
    tick_seconds: float = 0.5
    silo_liveness_seconds: float = 120.0  # a silo polled within this time is eligible for a round
    max_poll_seconds: float = 30.0
    keep_updates: bool = False  # keep spooled deltas after their round commits (for audits)
    keep_checkpoints: int = 0  # keep round 0 and the newest N checkpoints of a job; 0 keeps every one
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES  # the largest safetensors header an upload may declare
    sum_buffer_bytes: int = 1 << 30  # rounds' running sums kept for the next round (coordinator/sum_buffers.py)
    running_sum_bytes: int = 64 << 20  # larger sums: a round's plain updates summed at its close (aggregation.py)


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEDMEKI_COORDINATOR_", extra="forbid")

    address: str = "127.0.0.1:50051"
    kit: Path | None = None  # the coordinator's startup kit (fedmeki provision): mTLS on; none: plaintext
    # Without a kit, plaintext is served on loopback only; true allows it on any address (a network you trust).
    insecure_plaintext: bool = False
    data_dir: Path = Path("fedmeki-data")
    db: str | None = None  # any SQLAlchemy URL; default: SQLite under data_dir
    # The calls are coroutines on one event loop; what blocks (database, files, validating bytes) runs on a pool of
    # this many threads. The coordinator's threads are bounded by it (and a few fixed ones), whatever the silos.
    blocking_workers: int = Field(default=32, ge=2, le=1024)
    # At most this many calls are handled at once: gRPC's asyncio server takes no more from the connections until one
    # ends (they wait there; it does not refuse them), which bounds what calls hold in memory. It must exceed the sum
    # of the per-kind caps below, so that short calls get in and a call past a cap hears its retry hint at once.
    maximum_concurrent_rpcs: int = Field(default=2048, ge=8)
    chunk_bytes: int = Field(default=DEFAULT_CHUNK_BYTES, ge=1024, le=64 << 20)
    max_header_bytes: int = Field(default=DEFAULT_MAX_HEADER_BYTES, ge=1024)
    # A submitted job's initial weights: the safetensors header, which the coordinator parses into the job's
    # manifest (each job's NextTask answer carries it, under the message limit), is held to this.
    max_job_header_bytes: int = Field(default=1 << 20, ge=1024)
    max_update_bytes: int = Field(default=8 << 30, ge=1024)
    # The most samples an update or evaluation may declare: the count weighs it in the mean (INVALID_ARGUMENT above).
    max_update_samples: int = Field(default=1_000_000_000, ge=1)
    # Uploads beyond this many at once, or beyond upload_memory_bytes of buffers, are refused (RESOURCE_EXHAUSTED,
    # marked retry-later, with the silo's turn to come back): each holds a spool and buffers. An upload is charged
    # its size or, when larger, stream_window_bytes + 2 MiB (what it may hold at once): with the defaults, 32
    # uploads of a large model at a time, or 256 of a model under 0.5 MB (coordinator/upload_turns.py).
    max_concurrent_uploads: int = Field(default=256, ge=1)
    upload_memory_bytes: int = Field(default=128 << 20, ge=1 << 20)
    # The same, each marked retry-later, for the other calls that last: job submissions (their weights stream),
    # WatchJob streams and silos' long polls (NextTask with a wait). None holds a thread while it waits; a waiting
    # poll costs a few KiB, so the poll cap is high: one per silo, for hundreds of silos.
    max_concurrent_submissions: int = Field(default=4, ge=1)
    max_concurrent_watches: int = Field(default=16, ge=1)
    max_concurrent_polls: int = Field(default=1024, ge=1)
    # An upload is cut (DEADLINE_EXCEEDED) when a window of this many seconds of waiting for it brings no message,
    # or fewer bytes than upload_min_bytes_per_second times the window: a trickle is as good as idle. A silo's
    # chunk must arrive within one window (1 MiB chunks in 60 s: links faster than 17 KB/s).
    upload_idle_seconds: float = Field(default=60.0, gt=0)
    upload_min_bytes_per_second: float = Field(default=1024.0, ge=0)
    # Each upload stream's HTTP/2 receive window: bytes a silo may have in flight, so at most this / RTT per upload
    # (2 MiB: 200 Mbit/s at 40 ms); the coordinator may buffer this much per concurrent upload (transport_options).
    stream_window_bytes: int = Field(default=STREAM_WINDOW_BYTES, ge=65535, le=256 << 20)  # 65535: HTTP/2's default
    # HTTP/2 pings to a client after this many idle seconds; unanswered within the timeout, its connection is
    # closed and its calls end (an upload's slot is freed): how a silo behind a silently dead network is noticed.
    keepalive_seconds: float = Field(default=60.0, gt=0)
    keepalive_timeout_seconds: float = Field(default=20.0, gt=0)
    # Clients may ping this often at most (the agents' keepalive_seconds must not be lower); more often, and the
    # connection is closed with "too many pings".
    keepalive_min_client_seconds: float = Field(default=10.0, gt=0)
    tick_seconds: float = Field(default=0.5, gt=0)
    silo_liveness_seconds: float = Field(default=120.0, gt=0)
    max_poll_seconds: float = Field(default=30.0, gt=0)
    keep_updates: bool = False
    # An enrollment token (fedmeki-coordinator silo add, silo token) is refused this many hours after it was made.
    enrollment_token_ttl_hours: float = Field(default=168.0, gt=0, le=24 * 366)
    keep_checkpoints: int = Field(default=0, ge=0)  # round 0 and the newest N per job; 0 keeps all
    spool_pool_files: int = Field(default=8, ge=0)  # received files kept for reuse (see Spool)
    # Rounds' running sums (float64, 8 bytes a parameter) kept between rounds for the next round to fold into, up to
    # this many bytes in all: a buffer not yet touched costs a page fault a page (coordinator/sum_buffers.py).
    sum_buffer_bytes: int = Field(default=1 << 30, ge=0)
    # A round folds each update into running sums as it arrives while those sums (float64, 8 bytes a parameter) fit
    # in this many bytes; a larger model's plain float updates are summed when the round closes, from their files,
    # a block at a time: the coordinator's memory then holds one tensor's sum, not the model's (coordinator/
    # aggregation.py, "at close"). Encoded (int8, topk, 16-bit) and robust rounds keep their own ways.
    running_sum_bytes: int = Field(default=64 << 20, ge=0)
    grace_seconds: float = Field(default=10.0, ge=0)
    # Audit rows older than this many days are deleted (0: kept for ever); refusals of callers without a valid
    # identity are written at most this many a minute (0: all), the rest counted in the next one written.
    audit_retention_days: float = Field(default=365.0, ge=0)
    audit_anonymous_refusals_per_minute: int = Field(default=60, ge=0)
    # A silo's bearer credential, once verified, is trusted this many seconds without reading the database again: a
    # revocation (by the operator's CLI, in another process) takes effect within this time. 0: read on every call.
    credential_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    metrics_address: str | None = None  # HOST:PORT of the Prometheus endpoint (plain HTTP); none: not served
    health_address: str | None = None  # HOST:PORT of a plaintext port with only the gRPC health service; none: off
    # HOST:PORT of the read-only web dashboard (HTTPS with the kit's credentials, else plain HTTP); none: off
    dashboard_address: str | None = None

    @model_validator(mode="after")
    def _rpc_limit_beyond_long_calls(self) -> CoordinatorSettings:
        long_calls = (
            self.max_concurrent_uploads
            + self.max_concurrent_submissions
            + self.max_concurrent_watches
            + self.max_concurrent_polls
        )
        if long_calls >= self.maximum_concurrent_rpcs:  # else calls past no cap are refused, and short calls starve
            raise ValueError(
                f"max_concurrent_uploads + max_concurrent_submissions + max_concurrent_watches + "
                f"max_concurrent_polls ({long_calls}) must be below maximum_concurrent_rpcs "
                f"({self.maximum_concurrent_rpcs}): downloads and short calls must get in too, and the caps must "
                "answer with their retry hint before gRPC refuses"
            )
        return self

    @classmethod
    def load(cls, config: Path | None = None, **overrides: Any) -> CoordinatorSettings:
        """silo.yaml or coordinator.yaml values, then environment, then flags (None flags are ignored)."""
        return load_settings(cls, config, overrides)

    @property
    def database_url(self) -> str:
        return self.db or default_sqlite_url(self.data_dir)

    @property
    def scheduler(self) -> SchedulerSettings:
        return SchedulerSettings(
            tick_seconds=self.tick_seconds,
            silo_liveness_seconds=self.silo_liveness_seconds,
            max_poll_seconds=self.max_poll_seconds,
            keep_updates=self.keep_updates,
            keep_checkpoints=self.keep_checkpoints,
            max_header_bytes=self.max_header_bytes,
            sum_buffer_bytes=self.sum_buffer_bytes,
            running_sum_bytes=self.running_sum_bytes,
        )

    @property
    def enrollment_token_ttl(self) -> timedelta:
        return timedelta(hours=self.enrollment_token_ttl_hours)

    @property
    def max_message_bytes(self) -> int:
        return self.chunk_bytes + (1 << 20)  # a chunk plus room for the header fields
