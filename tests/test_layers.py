"""What each entry point loads: the health probe and the settings load neither the scheduler nor SQLAlchemy,
TenSEAL or torch; a coordinator that ran a whole job has never loaded torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import IO

import grpc
import pytest
from safetensors.numpy import save

from fedmeki_core.privacy.he import generate_context, public_bytes
from fedmeki_core.proto.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc, silo_pb2, silo_pb2_grpc
from tests.agents import wait_until
from tests.silo_wire import RawSilo, job_spec, submit_raw, tensors, weights_bytes
from tests.test_secure_aggregation import _upload as ckks_upload
from tests.test_secure_aggregation import ckks_spec, encrypted_canaries

_LOADED = """
import json, sys
import {module}
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("module", ["coordinator.healthcheck", "coordinator.settings"])
def test_the_health_probe_and_the_settings_load_no_database_or_crypto(module: str) -> None:
    loaded = set(
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _LOADED.format(module=module)], capture_output=True, text=True, check=True
            ).stdout
        )
    )
    assert {"sqlalchemy", "tenseal", "torch", "coordinator.scheduler", "coordinator.store"}.isdisjoint(loaded)
    assert module in loaded


_COORDINATOR_CHILD = """
import json, sys
from pathlib import Path
from typing import IO
from coordinator.server import Coordinator
from coordinator.settings import CoordinatorSettings
settings = CoordinatorSettings(address="127.0.0.1:0", data_dir=Path(sys.argv[1]), tick_seconds=0.05,
                               max_poll_seconds=2.0, grace_seconds=0.0)
coordinator = Coordinator(settings)
coordinator.start()
tokens = [coordinator.registry.add(name)[1] for name in ("a", "b", "c")]
print(json.dumps({"port": coordinator.port, "tokens": tokens}), flush=True)
sys.stdin.readline()  # the parent ran a whole job against it
coordinator.stop(grace=0)
print(json.dumps(sorted(sys.modules)), flush=True)
"""


def _enroll(address: str, token: str) -> RawSilo:
    with grpc.insecure_channel(address) as channel:
        response = silo_pb2_grpc.SiloServiceStub(channel).Enroll(silo_pb2.EnrollRequest(token=token))
    return RawSilo(address, response.credential)


def _job(address: str, job_id: str) -> common_pb2.Job:
    with grpc.insecure_channel(address) as channel:
        return jobs_pb2_grpc.JobServiceStub(channel).GetJob(jobs_pb2.GetJobRequest(job_id=job_id))


def _run_a_job(stdin: IO[str], stdout: IO[str], mode: str, directory: Path) -> set[str]:
    """Drive a whole job (three silos, one training round, the evaluation) against the child; its modules."""
    started = json.loads(stdout.readline())
    address = f"127.0.0.1:{started['port']}"
    silos = [_enroll(address, token) for token in started["tokens"]]
    for silo in silos:
        silo.poll()
    if mode == "ckks":
        secret = generate_context()
        spec = ckks_spec(secret, min_silos=3, rounds=1)
        job = submit_raw(address, spec, weights_bytes(), ckks_public_context=public_bytes(secret))
        samples = [10, 20, 30]
        _, updates = encrypted_canaries(secret, samples, directory)
        uploads = [
            lambda silo, path=path, n=n: ckks_upload(silo, job.id, path, n)
            for path, n in zip(updates, samples, strict=True)
        ]
    else:
        job = submit_raw(address, job_spec(min_silos=3, rounds=1), weights_bytes())
        uploads = [lambda silo, value=value: silo.upload(job.id, 1, save(tensors(value))) for value in (0.1, 0.3, 0.5)]
    for upload, silo in zip(uploads, silos, strict=True):
        wait_until(lambda silo=silo: silo.poll() is not None, 60, lambda: _job(address, job.id))
        upload(silo)
    for silo in silos:  # the final evaluation round
        wait_until(lambda silo=silo: _polls_round(silo, 2), 60, lambda: _job(address, job.id))
        silo.call("ReportEvaluation", silo_pb2.ReportEvaluationRequest(job_id=job.id, round=2, num_samples=5))
    completed = common_pb2.JOB_STATE_COMPLETED
    wait_until(lambda: _job(address, job.id).state == completed, 60, lambda: _job(address, job.id))
    stdin.write("done\n")
    stdin.flush()
    return set(json.loads(stdout.readline()))


def _polls_round(silo: RawSilo, number: int) -> bool:
    task = silo.poll()
    return task is not None and task.round == number


@pytest.mark.parametrize("mode", ["plain", "ckks"])
def test_a_coordinator_that_ran_a_whole_job_never_loaded_torch(tmp_path: Path, mode: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _COORDINATOR_CHILD, str(tmp_path / "coordinator")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            loaded = _run_a_job(child.stdin, child.stdout, mode, tmp_path)
        finally:
            child.kill()
    assert {"coordinator.scheduler", "coordinator.commit", "fedmeki_core.algorithms"} <= loaded  # a round ran
    assert {"torch", "transformers", "peft"}.isdisjoint(loaded)
