"""A raw SiloService caller for tests: speaks the protocol message by message, so tests can break it."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from safetensors.numpy import save

from fedmeki_core.channels import open_channel
from fedmeki_core.kits import Kit
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, silo_pb2, silo_pb2_grpc

TASK = "synthetic-vitals"
MANIFEST = {"a": ((4, 3), np.float32), "b": ((5,), np.float32)}


def tensors(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, dtype=dtype) for name, (shape, dtype) in MANIFEST.items()}


def weights_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return save({name: rng.normal(size=shape).astype(dtype) for name, (shape, dtype) in MANIFEST.items()})


def submit_raw(
    address: str,
    spec: common_pb2.JobSpec,
    weights: bytes,
    chunk: int = 100,
    kit: Kit | None = None,
    ckks_public_context: bytes = b"",
    request_id: str = "",
) -> common_pb2.Job:
    with open_channel(address, kit) as channel:
        messages = submission_messages(spec, weights, chunk, ckks_public_context, request_id)
        return jobs_pb2_grpc.JobServiceStub(channel).SubmitJob(messages)


def submission_messages(
    spec: common_pb2.JobSpec, weights: bytes, chunk: int = 100, ckks_public_context: bytes = b"", request_id: str = ""
) -> Iterator[jobs_pb2.SubmitJobRequest]:
    yield jobs_pb2.SubmitJobRequest(
        header=jobs_pb2.SubmitJobHeader(
            spec=spec,
            weights_size=len(weights),
            weights_sha256=hashlib.sha256(weights).hexdigest(),
            ckks_public_context=ckks_public_context,
            request_id=request_id,
        )
    )
    for start in range(0, len(weights), chunk):
        yield jobs_pb2.SubmitJobRequest(chunk=common_pb2.Chunk(offset=start, data=weights[start : start + chunk]))


def job_spec(**fields: object) -> common_pb2.JobSpec:
    values: dict[str, object] = {
        "name": "test",
        "task": TASK,
        "rounds": 1,
        "min_silos": 1,
        "round_deadline_seconds": 60,
    }
    values.update(fields)
    return common_pb2.JobSpec(**values)  # type: ignore[arg-type]


@dataclass
class RawSilo:
    """A silo by its bearer credential (plaintext) or, with `kit`, by its certificate (mTLS)."""

    address: str
    credential: str = ""
    kit: Kit | None = None

    def _stub(self, channel: grpc.Channel) -> silo_pb2_grpc.SiloServiceStub:
        return silo_pb2_grpc.SiloServiceStub(channel)

    def channel(self) -> grpc.Channel:
        return open_channel(self.address, self.kit)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.credential}")] if self.credential else []

    def call(self, method: str, request: Any) -> Any:
        """One SiloService call by its RPC name; DownloadModel's stream is read to the end, into a list."""
        with self.channel() as channel:
            response = getattr(self._stub(channel), method)(request, metadata=self.metadata)
            return list(response) if method == "DownloadModel" else response

    def poll(self, wait: float = 0.0) -> silo_pb2.TrainingTask | None:
        with self.channel() as channel:
            response = self._stub(channel).NextTask(
                silo_pb2.NextTaskRequest(tasks=[TASK], wait_seconds=wait, device="cpu"), metadata=self.metadata
            )
        return response.task if response.HasField("task") else None

    def upload_messages(self, messages: Iterable[silo_pb2.UploadUpdateRequest]) -> silo_pb2.UploadReceipt:
        with self.channel() as channel:
            return self._stub(channel).UploadUpdate(iter(messages), metadata=self.metadata)

    def upload(
        self,
        job_id: str,
        round_number: int,
        payload: bytes,
        num_samples: int = 10,
        chunk: int = 64,
        **header_overrides: object,
    ) -> silo_pb2.UploadReceipt:
        return self.upload_messages(
            update_messages(job_id, round_number, payload, num_samples, chunk, **header_overrides)
        )


def update_messages(
    job_id: str, round_number: int, payload: bytes, num_samples: int = 10, chunk: int = 64, **header_overrides: object
) -> list[silo_pb2.UploadUpdateRequest]:
    header: dict[str, object] = {
        "job_id": job_id,
        "round": round_number,
        "num_samples": num_samples,
        "encoding": "safetensors",
        "total_size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "metrics": common_pb2.Metrics(values={"eval_accuracy": 0.5}),
    }
    header.update(header_overrides)
    messages = [silo_pb2.UploadUpdateRequest(header=silo_pb2.UpdateHeader(**header))]  # type: ignore[arg-type]
    messages += [
        silo_pb2.UploadUpdateRequest(chunk=common_pb2.Chunk(offset=i, data=payload[i : i + chunk]))
        for i in range(0, len(payload), chunk)
    ]
    return messages
