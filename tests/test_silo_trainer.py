"""The silo's local trainer on the CPU: deltas that match the manifest, clear errors for bad inputs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmeki_core.errors import InvalidInputError, InvalidUpdateError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_model, exchanged_tensors
from fedmeki_core.records import CheckpointInfo, RoundKind, RoundTask
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.synthetic_vitals import generate
from fedmeki_core.wire import TensorSpec
from silo_agent.evaluation import finite_metrics
from silo_agent.settings import SiloSettings
from silo_agent.trainer import LocalTrainer, resolve_device

TASK = "synthetic-vitals"
SPEC = parse_job_spec(
    {"name": "unit", "task": TASK, "rounds": 2, "seed": 3, "algorithm": {"batch_size": 8, "learning_rate": 0.01}}
)


def _checkpoint(path: Path, drop: str | None = None) -> tuple[CheckpointInfo, list[TensorSpec]]:
    """The job's initial model as a silo would download it, and the round manifest."""
    tensors = exchanged_tensors(build_model(SPEC.model, TASK, seed=SPEC.seed))
    manifest = [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(tensors.items())]
    save_file({name: t for name, t in tensors.items() if name != drop}, str(path))
    return CheckpointInfo("job-1", 0, path.stat().st_size, sha256_file(path)), manifest


def _task(checkpoint: CheckpointInfo, manifest: list[TensorSpec], kind: RoundKind = RoundKind.TRAIN) -> RoundTask:
    return RoundTask("job-1", 1, kind, SPEC, checkpoint, manifest, deadline_seconds=60)


@pytest.fixture
def trainer(tmp_path: Path) -> LocalTrainer:
    data = tmp_path / "vitals.safetensors"
    save_dataset(generate(50, silo_index=0, num_silos=2, seed=1), data)
    settings = SiloSettings(coordinator="127.0.0.1:1", work_dir=tmp_path, device="cpu", data={TASK: data})
    return LocalTrainer.from_settings(settings)


def test_training_writes_a_delta_of_exactly_the_manifest_tensors(
    trainer: LocalTrainer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="silo_agent")
    checkpoint, manifest = _checkpoint(tmp_path / "global-00000.safetensors")
    result = trainer.train(_task(checkpoint, manifest), tmp_path / "global-00000.safetensors", tmp_path / "delta")

    delta = load_file(str(result.delta_path))
    assert sorted(delta) == [spec.name for spec in manifest]
    for spec in manifest:
        assert tuple(delta[spec.name].shape) == spec.shape
        assert delta[spec.name].dtype == torch.float32
        assert torch.isfinite(delta[spec.name]).all()
    assert any(bool(t.abs().sum() > 0) for t in delta.values())
    assert result.sha256 == sha256_file(result.delta_path)
    train, held_out = trainer.splits(TASK)
    assert (len(train), len(held_out)) == (40, 10)
    assert result.num_samples == len(train)
    figures = {
        f"eval_{name}{suffix}"
        for name in ("accuracy", "sensitivity", "specificity", "auc")
        for suffix in ("", ".n", ".lo", ".hi")
    }
    assert set(result.metrics) == {"eval_loss", "eval_f1", "eval_ece", "eval_ece.n", "train_loss", *figures}
    assert result.metrics["eval_accuracy.n"] == len(held_out)  # no reliability table in a training round
    assert "step 5/5" in caplog.text  # 40 samples in batches of 8, one epoch
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def test_training_twice_from_the_same_checkpoint_gives_the_same_delta(trainer: LocalTrainer, tmp_path: Path) -> None:
    checkpoint, manifest = _checkpoint(tmp_path / "global.safetensors")
    task = _task(checkpoint, manifest)
    first = trainer.train(task, tmp_path / "global.safetensors", tmp_path / "a")
    second = trainer.train(task, tmp_path / "global.safetensors", tmp_path / "b")
    assert first.sha256 == second.sha256


def test_evaluation_scores_the_global_model_on_the_holdout(trainer: LocalTrainer, tmp_path: Path) -> None:
    checkpoint, manifest = _checkpoint(tmp_path / "global.safetensors")
    task = _task(checkpoint, manifest, RoundKind.EVALUATE)
    samples, metrics = trainer.evaluate(task, tmp_path / "global.safetensors")
    assert samples == 10
    assert {"eval_loss", "eval_accuracy", "eval_accuracy.n", "eval_auc.lo", "eval_ece"} <= set(metrics)
    assert metrics["eval_accuracy.lo"] <= metrics["eval_accuracy"] <= metrics["eval_accuracy.hi"]
    bins = [key for key in metrics if key.startswith("eval_calibration.") and key.endswith(".n")]
    assert sum(metrics[key] for key in bins) == samples  # the final evaluation sends its reliability table


def test_a_checkpoint_missing_a_manifest_tensor_is_a_clear_error(trainer: LocalTrainer, tmp_path: Path) -> None:
    missing = "head.weight"
    checkpoint, manifest = _checkpoint(tmp_path / "global.safetensors", drop=missing)
    with pytest.raises(InvalidUpdateError, match=re.escape(f"tensor '{missing}' of the manifest is missing")):
        trainer.train(_task(checkpoint, manifest), tmp_path / "global.safetensors", tmp_path / "delta")
    assert not (tmp_path / "delta").exists()


def test_a_manifest_shape_that_differs_from_the_checkpoint_is_a_clear_error(
    trainer: LocalTrainer, tmp_path: Path
) -> None:
    checkpoint, manifest = _checkpoint(tmp_path / "global.safetensors")
    wrong = [TensorSpec(s.name, s.dtype, (*s.shape, 1)) if s.name == "head.bias" else s for s in manifest]
    with pytest.raises(InvalidUpdateError, match=r"'head\.bias': shape does not match the manifest"):
        trainer.evaluate(_task(checkpoint, wrong), tmp_path / "global.safetensors")


def test_a_gpu_that_is_not_there_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(InvalidInputError, match="no CUDA device"):
        resolve_device("cuda:7")
    assert resolve_device("auto").type == "cpu"


def test_a_device_that_is_not_a_device_is_a_clear_error() -> None:
    with pytest.raises(InvalidInputError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")


def test_malformed_or_missing_data_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"definitely not safetensors")
    trainer = LocalTrainer(resolve_device("cpu"), {TASK: bad}, 0.2)
    with pytest.raises(InvalidInputError, match="not a readable safetensors dataset"):
        trainer.splits(TASK)
    with pytest.raises(InvalidInputError, match="has no data for task"):
        trainer.splits("other-task")


@pytest.mark.gpu
def test_training_on_a_gpu_writes_the_same_kind_of_delta(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    data = tmp_path / "vitals.safetensors"
    save_dataset(generate(50, silo_index=0, num_silos=2, seed=1), data)
    trainer = LocalTrainer(resolve_device("cuda"), {TASK: data}, 0.2)
    checkpoint, manifest = _checkpoint(tmp_path / "global.safetensors")
    result = trainer.train(_task(checkpoint, manifest), tmp_path / "global.safetensors", tmp_path / "delta")
    delta = load_file(str(result.delta_path))
    assert [(name, tuple(t.shape)) for name, t in sorted(delta.items())] == [(s.name, s.shape) for s in manifest]
    assert all(bool(torch.isfinite(t).all()) for t in delta.values())
    assert "cuda" in trainer.device_label


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_on_a_gpu_learns(tmp_path: Path, precision: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    data = tmp_path / "vitals.safetensors"
    save_dataset(generate(400, silo_index=0, num_silos=1, seed=1), data)
    trainer = LocalTrainer(resolve_device("cuda"), {TASK: data}, 0.2, micro_batch_size=8, mixed_precision=precision)
    assert f"{precision} autocast" in trainer.device_label
    checkpoint, manifest = _checkpoint(tmp_path / "global.safetensors")
    result = trainer.train(_task(checkpoint, manifest), tmp_path / "global.safetensors", tmp_path / "delta")
    assert result.metrics["train_loss"] < result.metrics["eval_loss"]  # it learned from the round-0 model


def test_non_finite_metrics_are_dropped_not_sent(caplog: pytest.LogCaptureFixture) -> None:
    # A diverged global model evaluates to an infinite loss: the round's delta must still be uploadable.
    assert finite_metrics({"eval_accuracy": 0.5, "eval_loss": float("inf"), "train_loss": float("nan")}) == {
        "eval_accuracy": 0.5
    }
    assert "eval_loss, train_loss" in caplog.text
