"""Pretrained bases from a silo's own folder: fingerprints, refused folders, adapters as the exchanged model, every
algorithm of the registry on those tensors, and the instruction task's data."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from coordinator.server import Coordinator
from fedmeki_core.algorithms import ALGORITHMS
from fedmeki_core.client import FedmekiClient
from fedmeki_core.convert_spec import job_spec_from_proto, job_spec_to_proto
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import JobSpec, parse_job_spec
from fedmeki_core.models.base_folder import fingerprint
from fedmeki_core.models.build import build_job_model, exchanged_state, initial_tensors
from fedmeki_core.models.pretrained import PretrainedCausalLM
from fedmeki_core.records import CheckpointInfo, RoundKind, RoundTask
from fedmeki_core.tasks.dataset import save_dataset
from fedmeki_core.tasks.instructions import read_instructions, tokenize_instructions
from fedmeki_core.tasks.synthetic import generate
from fedmeki_core.wire import TensorSpec, read_manifest
from silo_agent.bases import BaseBudget, BaseRegistry
from silo_agent.trainer import LocalTrainer
from tests.bases import save_llama, save_vit, write_instructions
from tests.conftest import address, enroll
from tests.silo_wire import submit_raw


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_llama(tmp_path_factory.mktemp("bases") / "llama")


def _spec(**model: Any) -> dict[str, Any]:
    algorithm = model.pop("algorithm", {"batch_size": 8, "learning_rate": 0.01})
    return {
        "name": "adapters",
        "task": "instructions",
        "rounds": 1,
        "algorithm": algorithm,
        "model": {
            "architecture": "causal-lm",
            "pretrained": "llama",
            "config": {"max_length": 48},
            "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            **model,
        },
    }


def test_the_fingerprint_covers_the_tensors_not_the_files(llama: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(llama, tmp_path / "copy")
    assert fingerprint(copy) == fingerprint(llama)
    tensors = load_file(str(copy / "model.safetensors"))
    names = sorted(tensors)
    save_file({name: tensors[name] for name in reversed(names)}, str(copy / "model.safetensors"), {"x": "y"})
    assert fingerprint(copy) == fingerprint(llama)  # another order and other metadata: the same base
    half = len(names) // 2  # two shards: the same tensors
    (copy / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[:half]}, str(copy / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n] for n in names[half:]}, str(copy / "model-00002-of-00002.safetensors"))
    assert fingerprint(copy) == fingerprint(llama)
    tensors[names[0]] = tensors[names[0]].clone()
    tensors[names[0]].view(-1)[0] += 1e-3  # one value of one tensor
    save_file({n: tensors[n] for n in names[:half]}, str(copy / "model-00001-of-00002.safetensors"))
    assert fingerprint(copy) != fingerprint(llama)


def test_a_folder_with_pickle_weights_or_without_safetensors_is_refused(llama: Path, tmp_path: Path) -> None:
    pickled = shutil.copytree(llama, tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(InvalidInputError, match=r"holds pickle weights \(pytorch_model.bin\): only safetensors"):
        fingerprint(pickled)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match=r"holds no \.safetensors weights"):
        fingerprint(empty)
    with pytest.raises(InvalidInputError, match=r"not a save_pretrained folder \(no config.json\)"):
        fingerprint(tmp_path)


def test_model_specs_of_pretrained_bases_are_checked_and_travel_as_protobuf() -> None:
    spec = parse_job_spec(_spec(fingerprint="ab" * 32, heads=["lm_head"], quantization="4bit"))
    assert job_spec_from_proto(job_spec_to_proto(spec)) == spec
    bad = {
        "model.architecture": _spec(architecture="tiny-transformer"),
        "model.lora": _spec(lora=None),
        "model.lora.rank": _spec(lora={"rank": 0}),
        "model.lora.dropout": _spec(lora={"dropout": 1.0}),
        "model.lora.target_modules": _spec(lora={"target_modules": ["q_proj; rm"]}),
        "model.quantization": _spec(lora=None, heads=["lm_head"], quantization="4bit"),
        "model.pretrained": {**_spec(), "model": {"architecture": "causal-lm"}},
    }
    for field, data in bad.items():
        with pytest.raises(InvalidJobSpecError) as caught:
            parse_job_spec(data)
        assert caught.value.message.startswith(f"invalid job spec: {field}:"), (field, caught.value.message)


def test_the_exchanged_model_is_the_adapters_and_the_named_heads(llama: Path) -> None:
    spec = parse_job_spec(_spec())
    tensors = initial_tensors(spec, build_job_model(spec, llama))
    assert tensors and all(".lora_A." in name or ".lora_B." in name for name in tensors)
    assert {name.split(".")[-4] for name in tensors} == {"q_proj", "v_proj"}
    again = initial_tensors(spec, build_job_model(spec, llama))
    assert all(torch.equal(tensors[name], again[name]) for name in tensors)  # the same for the same seed
    with_head = parse_job_spec(_spec(heads=["*lm_head"]))
    heads = set(initial_tensors(with_head, build_job_model(with_head, llama))) - set(tensors)
    assert heads == {"base.base_model.model.lm_head.weight"}
    model = build_job_model(spec, llama)
    assert not any(name.startswith("base.") and "lora" not in name for name in exchanged_state(model))


def test_a_qlora_job_is_submitted_from_a_cpu_but_never_trained_on_one(llama: Path) -> None:
    spec = parse_job_spec(_spec(quantization="4bit"))
    plain = parse_job_spec(_spec())
    assert (
        initial_tensors(spec, build_job_model(spec, llama)).keys()
        == initial_tensors(plain, build_job_model(plain, llama)).keys()
    )
    with pytest.raises(InvalidInputError, match=r"quantization 4bit \(QLoRA\) needs a CUDA device; this silo"):
        build_job_model(spec, llama, torch.device("cpu"))


def test_a_target_module_or_head_the_base_lacks_is_refused(llama: Path) -> None:
    spec = parse_job_spec(_spec(lora={"target_modules": ["q_proj", "query"]}))
    with pytest.raises(InvalidInputError, match=r"model\.lora\.target_modules: the base has no module 'query'"):
        build_job_model(spec, llama)
    spec = parse_job_spec(_spec(heads=["classifier"]))
    with pytest.raises(InvalidInputError, match=r"model\.heads: no module of the base matches 'classifier'"):
        build_job_model(spec, llama)


def test_a_silo_declines_a_base_it_does_not_hold_as_the_job_does(llama: Path, tmp_path: Path) -> None:
    other = save_llama(tmp_path / "other", seed=1)
    pickled = shutil.copytree(llama, tmp_path / "pickled")
    (pickled / "pytorch_model.bin").write_bytes(b"")
    budget = BaseBudget(max_lora_rank=8, max_sequence_length=64)
    registry = BaseRegistry({"llama": llama, "other": other, "pickled": pickled}, torch.device("cpu"), budget)
    own = fingerprint(llama)

    def reason(**model: Any) -> str | None:
        return registry.decline_reason(parse_job_spec(_spec(fingerprint=own, **model)))

    assert reason() is None
    assert "base model 'other': this silo's copy has fingerprint" in str(reason(pretrained="other"))
    assert "base model 'pickled':" in str(reason(pretrained="pickled"))
    assert "pickle weights (pytorch_model.bin)" in str(reason(pretrained="pickled"))
    assert reason(pretrained="absent") == (
        "base model 'absent' is not mapped in this silo's models (it holds: llama, other, pickled)"
    )
    assert reason(lora={"rank": 16}) == "base model 'llama': LoRA rank 16 is above this silo's max_lora_rank 8"
    assert reason(config={"max_length": 128}) == (
        "base model 'llama': max_length 128 is above this silo's max_sequence_length 64"
    )
    assert reason(quantization="4bit") == (
        "base model 'llama': quantization 4bit (QLoRA) needs CUDA; this silo trains on the CPU"
    )


def test_instructions_train_on_the_answer_tokens_only(llama: Path, tmp_path: Path) -> None:
    spec = parse_job_spec(_spec())
    model = build_job_model(spec, llama)
    assert isinstance(model, PretrainedCausalLM)
    examples = read_instructions(write_instructions(tmp_path / "cards.jsonl", 6, seed=0))
    data = tokenize_instructions(examples, model.tokenizer, 48)
    features, labels = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    loss = model.batch_loss(features, labels)
    changed = features.clone()
    changed[:, 0] = 5  # a prompt token: the loss is the answer's, but the answer's context changes
    prompt_only = features.clone()
    for row, start in enumerate(labels.tolist()):
        prompt_only[row, start:] = -1  # no answer tokens left: nothing to learn
    assert torch.isfinite(loss) and not torch.isclose(loss, model.batch_loss(changed, labels))
    assert torch.isnan(model.batch_loss(prompt_only, labels))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "a"}\n{"instruction": "y"}\n')
    with pytest.raises(InvalidInputError, match=r"bad.jsonl: line 2: 'output' must be a non-empty string"):
        read_instructions(bad)


def _round(spec: JobSpec, tensors: dict[str, torch.Tensor], path: Path) -> RoundTask:
    save_file(tensors, str(path))
    manifest = [TensorSpec(name, "F32", tuple(t.shape)) for name, t in sorted(tensors.items())]
    checkpoint = CheckpointInfo("job-1", 0, path.stat().st_size, sha256_file(path))
    return RoundTask("job-1", 1, RoundKind.TRAIN, spec, checkpoint, manifest, deadline_seconds=60)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_trains_the_adapters_at_a_silo(llama: Path, tmp_path: Path, algorithm: str) -> None:
    data = write_instructions(tmp_path / "cards.jsonl", 20, seed=1)
    spec = parse_job_spec(_spec(algorithm={"name": algorithm, "batch_size": 8, "learning_rate": 0.01}))
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"fingerprint": fingerprint(llama)})})
    tensors = initial_tensors(spec, build_job_model(spec, llama))
    task = _round(spec, tensors, tmp_path / "global.safetensors")
    trainer = LocalTrainer(torch.device("cpu"), {"instructions": data}, 0.2, models={"llama": llama})
    result = trainer.train(task, tmp_path / "global.safetensors", tmp_path / "delta.safetensors")
    delta = load_file(str(result.delta_path))
    assert sorted(delta) == sorted(tensors)
    assert all(torch.isfinite(value).all() for value in delta.values())
    assert any(value.abs().max() > 0 for name, value in delta.items() if ".lora_" in name)
    assert result.num_samples == 16
    assert {"eval_loss", "eval_exact_match", "eval_bleu1", "train_loss"} <= result.metrics.keys()


def test_a_vit_classifier_trains_adapters_and_a_head_of_the_task_s_classes_on_x_rays(tmp_path: Path) -> None:
    vit = save_vit(tmp_path / "vit")
    spec = parse_job_spec(
        {
            "name": "vit",
            "task": "lung-opacity",
            "rounds": 1,
            "model": {
                "architecture": "image-classifier",
                "pretrained": "vit",
                "config": {"image_size": 32},
                "lora": {"rank": 4, "target_modules": ["q_proj", "v_proj"]},
            },
        }
    )
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"fingerprint": fingerprint(vit)})})
    tensors = initial_tensors(spec, build_job_model(spec, vit))
    head = {name: tuple(t.shape) for name, t in tensors.items() if ".lora_" not in name}
    assert head == {"base.base_model.model.classifier.weight": (2, 32), "base.base_model.model.classifier.bias": (2,)}

    data = tmp_path / "xrays.safetensors"
    save_dataset(generate("lung-opacity", 40, 0, 1, seed=2, image_size=32), data)
    trainer = LocalTrainer(torch.device("cpu"), {"lung-opacity": data}, 0.2, models={"vit": vit})
    task = _round(spec, tensors, tmp_path / "global.safetensors")
    result = trainer.train(task, tmp_path / "global.safetensors", tmp_path / "delta.safetensors")
    delta = load_file(str(result.delta_path))
    assert sorted(delta) == sorted(tensors) and delta["base.base_model.model.classifier.weight"].abs().max() > 0
    assert 0 <= result.metrics["eval_accuracy"] <= 1 and result.num_samples == 32


def test_the_client_fills_in_the_fingerprint_and_refuses_a_base_it_cannot_vouch_for(
    llama: Path, tmp_path: Path, sqlite_coordinator: Coordinator
) -> None:
    enroll(sqlite_coordinator, "st-marys")
    with FedmekiClient(address(sqlite_coordinator)) as client:
        job = client.submit_job(parse_job_spec(_spec()), base=llama)
        assert job.spec.model.fingerprint == fingerprint(llama)
        manifest = read_manifest(sqlite_coordinator.artifacts.checkpoint_path(job.id, 0))
        assert manifest and all(".lora_" in spec.name for spec in manifest)  # the coordinator holds adapters only

        with pytest.raises(InvalidJobSpecError, match=r"model\.fingerprint: does not match"):
            client.submit_job(parse_job_spec(_spec(fingerprint="0" * 64)), base=llama)
        with pytest.raises(InvalidJobSpecError, match=r"needs your copy of the base \(--base FOLDER\)"):
            client.submit_job(parse_job_spec(_spec()))
        weights = tmp_path / "adapters.safetensors"
        spec = parse_job_spec(_spec())
        save_file(initial_tensors(spec, build_job_model(spec, llama)), str(weights))
        with pytest.raises(InvalidJobSpecError, match=r"needs your copy of the base"):
            client.submit_job(spec, weights)  # no fingerprint to give the silos
        given = client.submit_job(parse_job_spec(_spec(fingerprint=fingerprint(llama))), weights)
        assert given.spec.model.fingerprint == fingerprint(llama)
    # Past the client, the coordinator itself refuses a job on a base without a fingerprint.
    with pytest.raises(grpc.RpcError) as caught:
        submit_raw(address(sqlite_coordinator), job_spec_to_proto(spec), weights.read_bytes())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model.fingerprint: a job on the base 'llama' needs its fingerprint" in str(caught.value.details())
