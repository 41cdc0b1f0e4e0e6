"""Several devices at one silo: a round trained by two gloo ranks on the CPU gives the delta one process gives on
the same global batch, rank 0 alone writes it, and a rank that fails fails the step instead of hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from coordinator.server import Coordinator
from fedmeki_core.client import FedmekiClient
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.models.base_folder import fingerprint
from fedmeki_core.models.build import build_job_model, initial_tensors
from fedmeki_core.records import CheckpointInfo, JobState, RoundKind, RoundState, RoundTask
from fedmeki_core.tasks.federation import write_synthetic_federation
from fedmeki_core.wire import TensorSpec
from silo_agent.distributed import (
    DistributedTraining,
    RankFailedError,
    injection_for,
    resolve_devices,
    training_for,
)
from silo_agent.injector import Injector
from silo_agent.job_state import JobStateStore
from silo_agent.settings import SiloSettings
from silo_agent.trainer import LocalTrainer
from tests.agents import describe_job, prepare_agent, wait_until
from tests.bases import save_llama, write_instructions
from tests.conftest import address

# Two ranks sum each batch's gradient in another order than one process accumulates it, and through float32
# buckets: rounding of ~1e-7 relative per step, which 12 Adam steps at lr 0.01 keep far below 1e-5 in the delta.
# Without the all-reduce (each rank stepping on its own half of the batch) this test fails.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("bases") / "llama")


def _task(llama: Path, folder: Path, algorithm: dict[str, Any]) -> RoundTask:
    spec: JobSpec = parse_job_spec(
        {
            "name": "ranks",
            "task": "instructions",
            "rounds": 1,
            "algorithm": algorithm,
            "model": {
                "architecture": "causal-lm",
                "pretrained": "llama",
                "config": {"max_length": 48},
                "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            },
        }
    )
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"fingerprint": fingerprint(llama)})})
    tensors = initial_tensors(spec, build_job_model(spec, llama))
    path = folder / "global.safetensors"
    save_file(tensors, str(path))
    manifest = [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(tensors.items())]
    checkpoint = CheckpointInfo("job-1", 0, path.stat().st_size, sha256_file(path))
    return RoundTask("job-1", 1, RoundKind.TRAIN, spec, checkpoint, manifest, deadline_seconds=60)


def _settings(tmp_path: Path, llama: Path, data: Path, **extra: Any) -> SiloSettings:
    return SiloSettings(
        work_dir=tmp_path / "silo",
        device="cpu",
        devices=["cpu", "cpu"],
        data={"instructions": data},
        models={"llama": llama},
        **extra,
    )


@pytest.mark.parametrize(
    "algorithm",
    [
        # 23 training samples in batches of 8 (the last one 7: shares of 4 and 3), micro-batches of 3 on each rank
        {"name": "fedavg", "batch_size": 8, "learning_rate": 0.01, "local_epochs": 2},
        # SCAFFOLD's control variates come from the job's state, which rank 0 alone writes
        {"name": "scaffold", "batch_size": 5, "learning_rate": 0.05},
    ],
    ids=["fedavg-adam", "scaffold-sgd"],
)
def test_two_gloo_ranks_give_the_delta_of_one_process_on_the_same_global_batch(
    llama: Path, tmp_path: Path, algorithm: dict[str, Any]
) -> None:
    data = write_instructions(tmp_path / "cards.jsonl", 29, seed=3)
    task = _task(llama, tmp_path, algorithm)
    checkpoint = tmp_path / "global.safetensors"
    alone, together = tmp_path / "alone", tmp_path / "together"
    settings = _settings(tmp_path, llama, data, micro_batch_size=3)

    trainer = LocalTrainer.from_settings(settings)
    one = trainer.train(task, checkpoint, alone / "delta.safetensors", job_state=JobStateStore(alone))
    training = training_for(settings, trainer)
    assert isinstance(training, DistributedTraining)
    two = training.train(task, checkpoint, together / "delta.safetensors", job_state=JobStateStore(together))

    assert one.num_samples == two.num_samples == 23
    assert two.sha256 == sha256_file(two.delta_path)
    expected, actual = load_file(str(one.delta_path)), load_file(str(two.delta_path))
    assert actual.keys() == expected.keys()
    assert any(value.abs().max() > 1e-3 for value in expected.values())  # it trained
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=RTOL, msg=name)
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-5)
    assert two.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-6)
    states = [sorted(p.name for p in folder.iterdir()) for folder in (alone, together)]
    assert states[0] == states[1]  # the same files: delta, and SCAFFOLD's state written once
    assert not (settings.work_dir / "ranks").exists() or not any((settings.work_dir / "ranks").iterdir())


def _ranks(folder: Path) -> dict[int, int]:
    """pid by rank of the rank processes launched for `folder`'s silo (read from /proc: Linux)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"silo_agent.distributed" in args and any(str(folder).encode() in arg for arg in args):
            found[int(args[-2])] = int(entry.name)
    return found


def test_a_killed_rank_fails_the_step_at_once_and_stops_the_other(llama: Path, tmp_path: Path) -> None:
    data = write_instructions(tmp_path / "cards.jsonl", 20, seed=3)
    task = _task(llama, tmp_path, {"batch_size": 4, "learning_rate": 0.01, "local_epochs": 1000})
    settings = _settings(tmp_path, llama, data)
    training = DistributedTraining(settings, resolve_devices(["cpu", "cpu"]))
    killed: list[int] = []

    def kill_rank_1() -> None:  # as soon as it runs (importing torch takes it seconds), as a power cut would
        while not killed:
            pid = _ranks(settings.work_dir).get(1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.05)

    threading.Thread(target=kill_rank_1, daemon=True).start()
    with pytest.raises(RankFailedError, match=r"rank 1 on cpu exited with code -9; the round is retried"):
        training.train(task, tmp_path / "global.safetensors", tmp_path / "delta.safetensors")
    assert killed and _ranks(settings.work_dir) == {}  # rank 0 was stopped too, not left waiting
    assert not (tmp_path / "delta.safetensors").exists()


def test_devices_are_one_kind_and_a_gpu_is_listed_once() -> None:
    assert resolve_devices(["cpu", "cpu"]) == [torch.device("cpu")] * 2
    with pytest.raises(InvalidInputError, match=r"no CUDA device|not both"):
        resolve_devices(["cpu", "cuda:0"])
    with pytest.raises(ValueError, match="devices: each is cpu, cuda or cuda:N, got 'tpu'"):
        SiloSettings(devices=["cpu", "tpu"])
    assert SiloSettings(devices="cuda:all").devices == "cuda:all"


def test_a_federation_round_commits_from_a_silo_on_two_ranks_after_one_of_them_is_killed(
    sqlite_coordinator: Coordinator, llama: Path, tmp_path: Path
) -> None:
    """A real coordinator and a real agent process with `devices: [cpu, cpu]`: its first try at the round loses
    rank 1 (SIGKILL); the agent trains the round again from its recorded download, and the round commits."""
    coordinator = sqlite_coordinator
    folder = tmp_path / "silo-0"
    settings = {
        "devices": ["cpu", "cpu"],
        "distributed_timeout_seconds": 120,
        "data": {"instructions": str(write_instructions(folder / "cards.jsonl", 24, seed=1))},
        "models": {"llama": str(llama)},
    }
    _, token = coordinator.registry.add(folder.name)
    agent = prepare_agent(address(coordinator), token, folder, 0, 1, 8, extra=settings)
    agent.start()
    try:
        with FedmekiClient(address(coordinator)) as client:
            spec = {
                "name": "two-ranks",
                "task": "instructions",
                "rounds": 1,
                "min_silos": 1,
                "round_deadline_seconds": 600,
                "algorithm": {"batch_size": 4, "learning_rate": 0.01, "local_epochs": 20},
                "model": {
                    "architecture": "causal-lm",
                    "pretrained": "llama",
                    "config": {"max_length": 48},
                    "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                },
            }
            job = client.submit_job(parse_job_spec(spec), base=llama)
            describe = lambda: describe_job(client.get_job(job.id)) + "\n" + agent.output()[-4000:]  # noqa: E731
            wait_until(lambda: 1 in _ranks(folder), 300, describe)
            os.kill(_ranks(folder)[1], signal.SIGKILL)
            wait_until(lambda: client.get_job(job.id).state.finished, 600, describe)
            final = client.get_job(job.id)
    finally:
        agent.stop()
    assert final.state == JobState.COMPLETED, describe_job(final)
    assert [(r.number, r.state) for r in final.rounds] == [(1, RoundState.COMMITTED), (2, RoundState.COMMITTED)]
    log = agent.output()
    assert "rank 1 on cpu exited with code -9; the round is retried" in log
    assert log.count("the train round on 2 ranks (cpu, cpu)") == 2
    assert final.rounds[0].silo_results[0].num_samples == 19


def test_two_gloo_ranks_sharding_the_base_with_fsdp_give_the_delta_of_one_process(llama: Path, tmp_path: Path) -> None:
    """`sharding: fsdp`: the base's parameters split across the ranks, the same delta as one process (the last
    batch of 7 gives rank 0 two micro-batches and rank 1 one: rank 1 joins FSDP's collectives with a filler pass).
    SGD, whose step scales with the gradient, so that FSDP's averaging of the ranks' gradients shows (Adam's
    would hide it)."""
    data = write_instructions(tmp_path / "cards.jsonl", 29, seed=3)
    task = _task(
        llama,
        tmp_path,
        {"name": "fedavg", "batch_size": 8, "learning_rate": 0.05, "local_epochs": 2, "options": {"optimizer": "sgd"}},
    )
    checkpoint = tmp_path / "global.safetensors"
    settings = _settings(tmp_path, llama, data, micro_batch_size=3, sharding="fsdp")
    trainer = LocalTrainer.from_settings(settings)
    one = trainer.train(task, checkpoint, tmp_path / "alone.safetensors")
    two = training_for(settings, trainer).train(task, checkpoint, tmp_path / "together.safetensors")

    expected, actual = load_file(str(one.delta_path)), load_file(str(two.delta_path))
    assert actual.keys() == expected.keys()
    assert any(value.abs().max() > 1e-3 for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=RTOL, msg=name)
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], rel=1e-5)
    assert two.metrics["eval_loss"] == pytest.approx(one.metrics["eval_loss"], rel=1e-6)


def test_a_job_whose_client_half_reads_whole_parameters_is_declined_by_a_sharding_silo(
    llama: Path, tmp_path: Path
) -> None:
    data = write_instructions(tmp_path / "cards.jsonl", 12, seed=3)
    task = _task(llama, tmp_path, {"name": "scaffold", "batch_size": 4, "learning_rate": 0.05})
    settings = _settings(tmp_path, llama, data, sharding="fsdp")
    training = training_for(settings, LocalTrainer.from_settings(settings))
    with pytest.raises(InvalidInputError, match=r"^sharding fsdp trains FedAvg's local loop only .*not scaffold$"):
        training.train(task, tmp_path / "global.safetensors", tmp_path / "delta.safetensors")


def test_each_of_two_fsdp_ranks_holds_about_half_of_the_parameters(llama: Path, tmp_path: Path) -> None:
    """The local shards' bytes, not RSS: together exactly the whole model, each rank about half of it (FSDP pads a
    dimension that does not split evenly, so a rank may hold a few rows more)."""
    command = [sys.executable, "-m", "tests.shard_rank", str(tmp_path), str(llama)]
    ranks = [subprocess.Popen([*command, str(rank), "2"], stdout=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [process.communicate(timeout=300)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    held = [json.loads(output.strip().splitlines()[-1]) for output in outputs]
    whole = held[0]["whole"]
    assert held[1]["whole"] == whole > 100_000
    assert sum(h["local"] for h in held) == whole
    for h in held:
        assert h["local"] == pytest.approx(whole / 2, rel=0.02)


def _injection_task(folder: Path) -> RoundTask:
    """Round 1's injection of a suite job on the tiny encoders: fine-tuned on the injector's public split."""
    spec = parse_job_spec(
        {
            "name": "inject-ranks",
            "task": "fedmeki",
            "rounds": 1,
            "model": {"architecture": "fedmeki-encoders-tiny"},
            "injection": {"epochs": 2, "batch_size": 5, "learning_rate": 2e-3, "experts": 4, "max_answer_tokens": 3},
        }
    )
    tensors = initial_tensors(spec, build_job_model(spec))
    path = folder / "global.safetensors"
    save_file(tensors, str(path))
    manifest = [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(tensors.items())]
    checkpoint = CheckpointInfo("job-1", 1, path.stat().st_size, sha256_file(path))
    return RoundTask("job-1", 1, RoundKind.INJECT, spec, checkpoint, manifest, deadline_seconds=60)


@pytest.mark.timeout(900)  # three injections of 8 tasks (two over two ranks): minutes on a loaded 2-core machine
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_two_gloo_ranks_inject_the_adapters_one_process_injects(tmp_path: Path, sharding: str) -> None:
    """The injector over `devices: [cpu, cpu]`: each rank fine-tunes on its share of every batch (each task's 6
    public samples make a batch of 5 and one of 1, which leaves rank 1 nothing), the ranks sum their gradients
    (FSDP: shards the model, the language model included) and rank 0 writes the adapters one process writes,
    within rounding."""
    data = write_synthetic_federation("fedmeki", 1, 30, tmp_path / "data", image_size=32, public_fraction=0.4).injector
    task = _injection_task(tmp_path)
    checkpoint = tmp_path / "global.safetensors"
    settings = [
        SiloSettings(
            work_dir=tmp_path / work,
            device="cpu",
            devices=["cpu", "cpu"],
            data=data,
            holdout_fraction=0.5,
            sharding=sharding,
        )
        for work in ("alone", "together")
    ]
    one = Injector(LocalTrainer.from_settings(settings[0]), settings[0].work_dir).inject(task, checkpoint)
    trainer = LocalTrainer.from_settings(settings[1])
    injection = injection_for(training_for(settings[1], trainer), trainer, settings[1].work_dir)
    assert isinstance(injection, DistributedTraining)
    two = injection.inject(task, checkpoint)

    assert two[0] == one[0] > 0 and two[1].keys() == one[1].keys()
    assert two[1]["injection_loss"] == pytest.approx(one[1]["injection_loss"], rel=1e-5)
    expected, actual = (
        load_file(str(s.work_dir / "injector" / "job-1" / "adapters-00001.safetensors")) for s in settings
    )
    assert actual.keys() == expected.keys()
    assert all(expected[name].abs().max() > 1e-3 for name in expected if name.endswith(".lora_b"))  # from zeros
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=ATOL, rtol=RTOL, msg=name)
