"""The chaos test's two hostile actors: a researcher who submits bad jobs over raw gRPC, and a silo that answers
every round it is handed with a broken upload. Each records what it sent and what came back."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.protobuf import struct_pb2
from safetensors.numpy import save
from safetensors.torch import save as save_torch

from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_job_model, initial_tensors
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, silo_pb2
from fedmeki_core.wire import LOCAL_STEPS_KEY
from tests.silo_wire import TASK, RawSilo, job_spec, submission_messages, submit_raw, update_messages, weights_bytes

STALL_SECONDS = 8.0  # a stalled stream's client gives up after this; the coordinator's idle limit is shorter

# The cause a refusal of each hostile trick names.
TRICK_CAUSES = {
    "values 3e38": "max_abs_value",
    "local_steps of 400 nines": LOCAL_STEPS_KEY,
    "local_steps superscript": LOCAL_STEPS_KEY,
    "30,000 metric names": "names",
    "renamed tensor": "renamed",
    "declared 1 TiB": "size",
    "samples 10**18": "num_samples",
    "stalled stream": "stalled",
    "evaluation of 30,000 metric names": "names",
    "evaluation loss NaN": "finite",
}


@dataclass
class Outcome:
    """One bad input and the cause its refusal (or its job's failure) must name."""

    case: str
    cause: str
    refusal: str = ""  # the status and details of a refusal at the door; "" when it got through
    job_id: str = ""  # a job the coordinator accepted, to fail later


def _struct(values: dict[str, object]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _tiny(**config: object) -> common_pb2.ModelSpec:
    return common_pb2.ModelSpec(architecture="tiny-transformer", config=_struct(config))


def _options(**options: object) -> common_pb2.AlgorithmSpec:
    return common_pb2.AlgorithmSpec(name="fedavg", options=_struct(options))


def model_weights(**config: object) -> bytes:
    """The initial weights `fedmeki job submit` would build for the tiny model with `config`."""
    spec = parse_job_spec({"name": "w", "task": TASK, "rounds": 1, "model": {"config": config}})
    return save_torch(initial_tensors(spec, build_job_model(spec)))


def bad_jobs(variant: int, good: bytes, other_shapes: bytes) -> list[tuple[str, str, common_pb2.JobSpec, bytes]]:
    """The issue's bad jobs and variations on them (`variant` changes the numbers): (case, cause, spec, weights)."""
    v = variant + 1
    layers = 1 + 3 * (variant % 2)
    dp = common_pb2.DifferentialPrivacy(mode="central", clip_norm=1.0, noise_multiplier=1e39 * v)
    return [
        ("deadline inf", "round_deadline_seconds", job_spec(round_deadline_seconds=float("inf")), good),
        ("deadline huge", "round_deadline_seconds", job_spec(round_deadline_seconds=1e300 * v), good),
        ("hidden_size huge", "hidden_size", job_spec(model=_tiny(hidden_size=65536 * v)), weights_bytes()),
        ("dropout 2", "dropout", job_spec(model=_tiny(dropout=2.0 * v)), good),
        ("heads do not divide", "num_heads", job_spec(model=_tiny(hidden_size=32, num_heads=3 + 2 * variant)), good),
        ("noise 1e39", "noise_multiplier", job_spec(privacy=common_pb2.PrivacySpec(dp=dp)), good),
        ("update norm negative", "max_update_norm", job_spec(algorithm=_options(max_update_norm=-1e300 * v)), good),
        ("max_abs_value inf", "algorithm.options", job_spec(algorithm=_options(max_abs_value=float("inf"))), good),
        ("max_silo_weight huge", "max_silo_weight", job_spec(algorithm=_options(max_silo_weight=1e30 * v)), good),
        ("rounds huge", "rounds", job_spec(rounds=2_000_000_000), good),
        ("learning rate inf", "learning_rate", job_spec(algorithm=common_pb2.AlgorithmSpec(learning_rate=1e999)), good),
        ("name escapes", "name", job_spec(name=f"evil\x1b[2J\nforged {v}"), good),
        ("truncated weights", "size", job_spec(), good[: -100 * v]),
        ("renamed tensor", "is missing", job_spec(), weights_bytes(variant)),
        ("reshaped tensor", "shape", job_spec(), other_shapes),
        # One layer passes the coordinator's 2e9 cap and meets the silos' budget; four do not pass it.
        (
            "huge model",
            "parameters",
            job_spec(model=_tiny(hidden_size=8192, intermediate_size=65536, num_layers=layers)),
            good,
        ),
    ]


@dataclass
class BadResearcher:
    """Submits `bad_jobs` round after round (and a stalled submission each time) until `stop` is set."""

    address: str
    honest_silos: list[str]
    stop: threading.Event
    outcomes: list[Outcome] = field(default_factory=list)
    stalled: list[str] = field(default_factory=list)

    def run(self) -> None:
        good, other_shapes = model_weights(), model_weights(hidden_size=16)
        for variant in itertools.count():
            for case, cause, spec, weights in bad_jobs(variant, good, other_shapes):
                if self.stop.is_set() and variant > 0:
                    return
                # Accepted bad jobs select the honest silos only: their declines name the cause; the hostile
                # silo is there to attack the honest jobs.
                spec.silos[:] = self.honest_silos
                spec.min_silos = len(self.honest_silos)
                spec.name = spec.name if case == "name escapes" else f"bad {case} {variant}"
                outcome = Outcome(case, cause)
                try:
                    outcome.job_id = submit_raw(self.address, spec, weights).id
                except grpc.RpcError as error:
                    outcome.refusal = f"{error.code().name}: {error.details()}"
                self.outcomes.append(outcome)
            stalled = self._stalled_submission()
            if not self.stop.is_set():  # else the stream ended early, a refusal for another cause
                self.stalled.append(stalled)

    def _stalled_submission(self) -> str:
        """A header and then nothing: the coordinator cuts it at its idle limit."""

        def messages() -> Iterator[jobs_pb2.SubmitJobRequest]:
            yield next(submission_messages(job_spec(name="stalled"), weights_bytes()))
            self.stop.wait(STALL_SECONDS * 2)

        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = channel.stream_unary(
                    "/fedmeki.v1.JobService/SubmitJob",
                    request_serializer=jobs_pb2.SubmitJobRequest.SerializeToString,
                    response_deserializer=common_pb2.Job.FromString,
                )
                stub(messages(), timeout=STALL_SECONDS)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
        return "OK"


@dataclass
class HostileSilo:
    """Polls like a silo and answers each round with the next trick in turn; never uploads a valid update."""

    silo: RawSilo
    stop: threading.Event
    sent: list[tuple[str, str]] = field(default_factory=list)  # (trick, status: details)
    receipts: int = 0

    def run(self) -> None:
        tricks = itertools.cycle(self._tricks())
        evaluations = itertools.cycle(self._evaluation_tricks())
        while not self.stop.is_set():
            try:
                task = self.silo.poll(wait=2)
            except grpc.RpcError:
                time.sleep(0.5)
                continue
            if task is None:
                continue
            for _ in range(3):  # several tricks per round: each is refused, so the round is still open
                name, send = next(evaluations if task.kind == common_pb2.ROUND_KIND_EVALUATE else tricks)
                try:
                    send(task)
                    self.receipts += 1
                    self.sent.append((name, "OK"))
                except grpc.RpcError as error:
                    if not self.stop.is_set():  # a stalled stream ends early then, refused for another cause
                        self.sent.append((name, f"{error.code().name}: {error.details()}"))
            self.stop.wait(0.5)  # the round comes back at the next poll; the machine is shared

    def _tricks(self) -> list[tuple[str, Callable[[silo_pb2.TrainingTask], object]]]:
        return [
            ("values 3e38", lambda t: self._upload(t, _payload(t, 3.0e38))),
            ("local_steps of 400 nines", lambda t: self._upload(t, _payload(t, 0.01, {LOCAL_STEPS_KEY: "9" * 400}))),
            ("local_steps superscript", lambda t: self._upload(t, _payload(t, 0.01, {LOCAL_STEPS_KEY: "²"}))),
            ("30,000 metric names", lambda t: self._upload(t, _payload(t, 0.01), metrics=_flood())),
            ("renamed tensor", lambda t: self._upload(t, _payload(t, 0.01, rename=True))),
            ("declared 1 TiB", lambda t: self._upload(t, _payload(t, 0.01), total_size=1 << 40)),
            ("samples 10**18", lambda t: self._upload(t, _payload(t, 0.01), num_samples=10**18)),
            ("stalled stream", self._stalled),
        ]

    def _evaluation_tricks(self) -> list[tuple[str, Callable[[silo_pb2.TrainingTask], object]]]:
        return [
            ("evaluation of 30,000 metric names", lambda t: self._report(t, _flood())),
            ("evaluation loss NaN", lambda t: self._report(t, common_pb2.Metrics(values={"loss": float("nan")}))),
        ]

    def _report(self, task: silo_pb2.TrainingTask, metrics: common_pb2.Metrics) -> object:
        request = silo_pb2.ReportEvaluationRequest(job_id=task.job_id, round=task.round, num_samples=10)
        request.metrics.CopyFrom(metrics)
        return self.silo.call("ReportEvaluation", request)

    def _upload(self, task: silo_pb2.TrainingTask, payload: bytes, **header: object) -> object:
        return self.silo.upload(task.job_id, task.round, payload, chunk=1 << 16, **header)

    def _stalled(self, task: silo_pb2.TrainingTask) -> object:
        messages = update_messages(task.job_id, task.round, _payload(task, 0.01), chunk=1 << 10)

        def stalling() -> Iterator[silo_pb2.UploadUpdateRequest]:
            yield from messages[:2]
            self.stop.wait(STALL_SECONDS * 2)

        with self.silo.channel() as channel:
            stub = self.silo._stub(channel)
            return stub.UploadUpdate(stalling(), metadata=self.silo.metadata, timeout=STALL_SECONDS)


def _flood() -> common_pb2.Metrics:
    return common_pb2.Metrics(values={f"m{i}": 0.5 for i in range(30_000)})


def _payload(
    task: silo_pb2.TrainingTask, value: float, metadata: dict[str, str] | None = None, rename: bool = False
) -> bytes:
    """A delta of the round's manifest, every value `value`."""
    arrays = {
        (f"{spec.name}.renamed" if rename and index == 0 else spec.name): np.full(tuple(spec.shape), value, np.float32)
        for index, spec in enumerate(task.manifest)
    }
    return save(arrays, metadata=metadata)
