"""Several devices at one silo: a training round as a torch.distributed data-parallel job, one process per device.

The agent launches the ranks itself as `python -m silo_agent.distributed FOLDER RANK` subprocesses (not torchrun,
not torch.multiprocessing): it holds each rank's process, so the first rank that exits with an error, or is
killed, makes it stop the others at once and fail the step, and the round is trained again from the agent's
durable state (silo_agent/state.py records the download; the delta only once rank 0 has written it), as after a
crash of the agent; torchrun's elastic restarts would retry behind the agent's back, and spawn passes its
arguments by pickle. What the ranks need travels as files in a fresh folder per attempt: the task (protobuf),
the settings (JSON); rank 0 answers with JSON. Ranks meet through a file store in that folder (no port to pick),
each runs LocalTrainer.train on its device; the shared loop (fedmeki_core/training/local_training.py) splits
every batch across them and sums their gradients, and only rank 0 writes the delta and the job's state.
A rank stops when the agent that launched it is gone, and a collective that waits longer than
`distributed_timeout_seconds` for a rank fails, so a lost rank never leaves the others hanging.
An injector's injection of a checkpoint (silo_agent/injector.py) runs over the devices the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch

from fedmeki_core import convert
from fedmeki_core.errors import FedmekiError, InvalidInputError, NotFoundError
from fedmeki_core.files import atomic_write
from fedmeki_core.proto.v1 import silo_pb2
from fedmeki_core.records import RoundTask
from silo_agent.injector import Injector
from silo_agent.job_state import JobStateStore
from silo_agent.settings import SiloSettings
from silo_agent.trainer import LocalTrainer, TrainingResult, resolve_device

logger = logging.getLogger(__name__)

_POLL_SECONDS = 0.2
_STOP_SECONDS = 10.0  # a rank told to stop (SIGTERM) is killed after this long
_GIVE_UP = 3  # a rank's exit code when the round cannot be trained here (the agent abandons it, as alone)
_LOG_TAIL = 2000


class RankFailedError(FedmekiError):
    """A rank of a several-device round exited with an error or was killed: the round is trained again."""


class Training(Protocol):
    """What trains a round: LocalTrainer on one device, DistributedTraining over several."""

    def train(
        self,
        task: RoundTask,
        checkpoint: Path,
        delta_path: Path,
        reuse: Path | None = None,
        job_state: JobStateStore | None = None,
    ) -> TrainingResult: ...


class Injection(Protocol):
    """What injects a checkpoint at the injector: Injector on one device, DistributedTraining over several."""

    def inject(self, task: RoundTask, checkpoint: Path) -> tuple[int, dict[str, float]]: ...


def resolve_devices(devices: list[str] | str) -> list[torch.device]:
    """The devices of silo.yaml `devices`; all CPU (gloo) or all CUDA (nccl), a GPU at most once."""
    if devices == "cuda:all":
        if not torch.cuda.is_available():
            raise InvalidInputError("devices cuda:all: this machine has no CUDA device")
        return [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    resolved = [resolve_device(name) for name in devices]
    resolved = [torch.device("cuda", 0) if d.type == "cuda" and d.index is None else d for d in resolved]
    if len({d.type for d in resolved}) > 1:
        raise InvalidInputError("devices: all cpu or all cuda, not both (one backend serves the ranks)")
    gpus = [d for d in resolved if d.type == "cuda"]
    if len(set(gpus)) != len(gpus):
        raise InvalidInputError("devices: a GPU is listed twice (NCCL takes one rank per GPU)")
    return resolved


def training_for(settings: SiloSettings, trainer: LocalTrainer) -> Training:
    """The trainer itself, or with several devices the launcher of its ranks."""
    if settings.devices is None:
        return trainer
    devices = resolve_devices(settings.devices)
    return trainer if len(devices) == 1 and devices[0] == trainer.device else DistributedTraining(settings, devices)


def injection_for(training: Training, trainer: LocalTrainer, work_dir: Path) -> Injection:
    """The injector on the trainer's device, or over the devices `training` launches its ranks on."""
    return training if isinstance(training, DistributedTraining) else Injector(trainer, work_dir)


class DistributedTraining:
    def __init__(self, settings: SiloSettings, devices: list[torch.device]) -> None:
        self._settings = settings
        self._devices = devices
        # The folders of attempts a killed agent left behind (their ranks ended with it).
        shutil.rmtree(settings.work_dir / "ranks", ignore_errors=True)

    def train(
        self,
        task: RoundTask,
        checkpoint: Path,
        delta_path: Path,
        reuse: Path | None = None,
        job_state: JobStateStore | None = None,
    ) -> TrainingResult:
        """LocalTrainer.train over the devices: the same delta as one process with the same global batch."""
        work = {
            "work": "train",
            "checkpoint": str(checkpoint),
            "delta": str(delta_path),
            "reuse": None if reuse is None else str(reuse),
            "job_state": None if job_state is None else [str(job_state.folder), job_state.kind],
        }
        answer = self._launch(task, work)
        return TrainingResult(delta_path, answer["sha256"], answer["num_samples"], answer["metrics"])

    def inject(self, task: RoundTask, checkpoint: Path) -> tuple[int, dict[str, float]]:
        """Injector.inject over the devices: the adapters one process would train on the same batches."""
        answer = self._launch(task, {"work": "inject", "checkpoint": str(checkpoint)})
        return int(answer["num_samples"]), dict(answer["metrics"])

    def _launch(self, task: RoundTask, work: dict[str, Any]) -> dict[str, Any]:
        """Run the ranks on `work` in a fresh folder; rank 0's answer."""
        folder = self._settings.work_dir / "ranks" / uuid.uuid4().hex
        folder.mkdir(parents=True)
        try:
            (folder / "task.pb").write_bytes(convert.task_to_proto(task).SerializeToString())
            request = {
                "settings": self._settings.model_dump(mode="json"),
                "devices": [str(device) for device in self._devices],
                **work,
            }
            (folder / "request.json").write_text(json.dumps(request))
            self._run_ranks(folder, task)
            answer: dict[str, Any] = json.loads((folder / "result.json").read_text())
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return answer

    def _run_ranks(self, folder: Path, task: RoundTask) -> None:
        sharded = self._settings.sharding == "fsdp" and task.spec.model.pretrained is not None
        logger.info(
            "job %s round %d: the %s round on %d ranks (%s)%s",
            task.job_id,
            task.round,
            task.kind.value,
            len(self._devices),
            ", ".join(map(str, self._devices)),
            ", the base sharded with FSDP" if sharded else "",
        )
        ranks = []
        for rank in range(len(self._devices)):
            with (folder / f"rank-{rank}.log").open("wb") as log:
                ranks.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "silo_agent.distributed", str(folder), str(rank)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        try:
            while True:
                codes = [process.poll() for process in ranks]
                failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
                if failed:
                    self._fail(folder, failed[0], codes[failed[0]])
                if all(code == 0 for code in codes):
                    return
                time.sleep(_POLL_SECONDS)
        finally:
            _stop(ranks)

    def _fail(self, folder: Path, rank: int, code: int | None) -> None:
        log = (folder / f"rank-{rank}.log").read_text(errors="replace")[-_LOG_TAIL:]
        reason = folder / f"error-{rank}.txt"
        if code == _GIVE_UP and reason.is_file():  # the same inputs would fail the same way again: give up
            raise InvalidInputError(reason.read_text())
        logger.error("rank %d (%s) exited with code %s; its log ends:\n%s", rank, self._devices[rank], code, log)
        raise RankFailedError(f"rank {rank} on {self._devices[rank]} exited with code {code}; the round is retried")


def _stop(ranks: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the ranks still running, then SIGKILL the ones that have not stopped in _STOP_SECONDS."""
    for process in ranks:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + _STOP_SECONDS
    for process in ranks:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _watch_parent(parent: int) -> None:
    """End this rank when the agent that launched it is gone (killed: nobody else would stop it)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _rank_main(folder: Path, rank: int) -> int:
    request = json.loads((folder / "request.json").read_text())
    settings = SiloSettings.model_validate(request["settings"])
    devices = [torch.device(name) for name in request["devices"]]
    device = devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the CPU's cores shared among the CPU ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // len(devices)))
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"file://{folder / 'rendezvous'}",
        rank=rank,
        world_size=len(devices),
        timeout=timedelta(seconds=settings.distributed_timeout_seconds),
    )
    try:
        trainer = LocalTrainer.from_settings(settings.model_copy(update={"device": str(device)}))
        task = convert.task_from_proto(silo_pb2.TrainingTask.FromString((folder / "task.pb").read_bytes()))
        try:
            answer = _work(request, rank, trainer, settings.work_dir, task)
        except (InvalidInputError, NotFoundError) as exc:
            (folder / f"error-{rank}.txt").write_text(exc.message)
            return _GIVE_UP
        if rank == 0:
            with atomic_write(folder / "result.json") as f:
                f.write(json.dumps(answer).encode())
        torch.distributed.barrier()  # every rank is done before any leaves: a rank that ends early is not a failure
    finally:
        torch.distributed.destroy_process_group()
    return 0


def _work(request: dict[str, Any], rank: int, trainer: LocalTrainer, work_dir: Path, task: RoundTask) -> dict[str, Any]:
    """This rank's part of the request's work: a training round, or an injection; what rank 0 answers."""
    if request["work"] == "inject":
        samples, metrics = Injector(trainer, work_dir).inject(task, Path(request["checkpoint"]))
        return {"num_samples": samples, "metrics": metrics}
    state = request["job_state"]
    reuse = request["reuse"] if rank == 0 else None
    result = trainer.train(
        task,
        Path(request["checkpoint"]),
        Path(request["delta"]),
        None if reuse is None else Path(reuse),
        None if state is None else JobStateStore(Path(state[0]), state[1]),
    )
    return {"sha256": result.sha256, "num_samples": result.num_samples, "metrics": result.metrics}


if __name__ == "__main__":
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank %(process)d %(name)s: %(message)s")
    sys.exit(_rank_main(Path(sys.argv[1]), int(sys.argv[2])))
