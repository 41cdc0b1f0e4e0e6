"""Algorithms that keep state at the silo: SCAFFOLD, Ditto, Per-FedAvg and personal tensors (FedBN / FedPer)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from in_process import in_process_agents, run_job
from safetensors.torch import load_file, save_file
from torch import nn

from coordinator.server import Coordinator
from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.errors import InvalidInputError, InvalidJobSpecError
from fedmeki_core.files import sha256_file
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_job_model, initial_tensors
from fedmeki_core.records import CheckpointInfo, JobState, RoundKind, RoundTask
from fedmeki_core.tasks.dataset import ArrayDataset, save_dataset
from fedmeki_core.tasks.synthetic import generate
from fedmeki_core.training import LocalSettings, RoundContext, client_half
from fedmeki_core.wire import TensorSpec
from silo_agent.job_state import JobStateStore
from silo_agent.trainer import LocalTrainer, resolve_device

LR = 0.1
CONTROL = "algorithm/scaffold.control/"


def _linear_setup() -> tuple[nn.Module, ArrayDataset]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    rng = np.random.default_rng(1)
    return model, ArrayDataset(rng.normal(size=(8, 3)), rng.integers(0, 2, size=8))  # type: ignore[arg-type]


def _gradient(model: nn.Module, data: ArrayDataset) -> dict[str, torch.Tensor]:
    loss = nn.functional.cross_entropy(model(torch.from_numpy(data.features)).float(), torch.from_numpy(data.labels))
    names, params = zip(*model.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def test_one_scaffold_round_by_hand() -> None:
    """One full-batch SGD step: y = x - lr (g + c - c_i), and then c_i+ = c_i - c + (x - y) / lr = g."""
    model, data = _linear_setup()
    x = {name: p.detach().clone() for name, p in model.named_parameters()}
    g = _gradient(copy.deepcopy(model), data)
    rng = np.random.default_rng(3)
    c = {f"{CONTROL}{n}": torch.from_numpy(rng.normal(size=t.shape)) for n, t in x.items()}
    c_i = {f"scaffold.own/{n}": torch.from_numpy(rng.normal(size=t.shape)) for n, t in x.items()}
    context = RoundContext(global_tensors=x, extras=c, state=dict(c_i))
    entry = get_algorithm("scaffold")
    client = client_half(entry, entry.resolve_options({}))
    client.begin(model, context)
    settings = LocalSettings(local_epochs=1, batch_size=8, learning_rate=LR, seed=0)
    client.train(model, data, settings, torch.device("cpu"))
    client.finish(model, context)
    for name, p in model.named_parameters():
        correction = c[f"{CONTROL}{name}"] - c_i[f"scaffold.own/{name}"]
        torch.testing.assert_close(p.detach(), x[name] - LR * (g[name].double() + correction), rtol=0, atol=1e-6)
        torch.testing.assert_close(context.state[f"scaffold.own/{name}"], g[name].double(), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            context.extra_deltas[f"{CONTROL}{name}"], g[name].double() - c_i[f"scaffold.own/{name}"], rtol=0, atol=1e-5
        )


def test_the_scaffold_server_moves_c_by_the_mean_whatever_the_server_learning_rate() -> None:
    entry = get_algorithm("scaffold")
    server = entry.server(entry.resolve_options({"server_learning_rate": 0.5}))
    current, delta = np.full(3, 2.0, np.float32), np.full(3, 1.0, np.float32)
    assert server.apply(f"{CONTROL}w", current, delta.copy(), {}).tolist() == [3.0] * 3
    assert server.apply("w", current, delta.copy(), {}).tolist() == [2.5] * 3


def test_initial_weights_carry_extras_and_leave_out_personal_tensors() -> None:
    spec = parse_job_spec({"name": "j", "task": "synthetic-vitals", "rounds": 1, "algorithm": {"name": "scaffold"}})
    tensors = initial_tensors(spec, build_job_model(spec))
    model = [n for n in tensors if not n.startswith("algorithm/")]
    assert sorted(n for n in tensors if n.startswith(CONTROL)) == sorted(f"{CONTROL}{n}" for n in model)
    assert all(not tensors[n].any() for n in tensors if n.startswith(CONTROL))
    get_algorithm("scaffold").check_manifest(tensors)  # the coordinator's check accepts them
    with pytest.raises(InvalidInputError, match=r"needs \d+ extra tensors"):
        get_algorithm("scaffold").check_manifest(model)
    with pytest.raises(InvalidInputError, match="does not use"):
        get_algorithm("fedavg").check_manifest(tensors)

    personal = parse_job_spec(
        {"name": "j", "task": "synthetic-vitals", "rounds": 1, "algorithm": {"personal": ["head.*"]}}
    )
    shared = initial_tensors(personal, build_job_model(personal))
    assert shared and not [n for n in shared if n.startswith("head.")]
    for patterns, message in ((["nothing*"], "no tensor"), (["*"], "nothing would be shared")):
        bad = parse_job_spec(
            {"name": "j", "task": "synthetic-vitals", "rounds": 1, "algorithm": {"personal": patterns}}
        )
        with pytest.raises(InvalidJobSpecError, match=message):
            initial_tensors(bad, build_job_model(bad))


def test_the_job_state_store_reads_the_newest_earlier_round_and_prunes(tmp_path: Path) -> None:
    store = JobStateStore(tmp_path / "job")
    assert store.load(1) == {}
    store.save(1, {"a": torch.ones(2)})
    store.save(2, {"a": torch.full((2,), 2.0)})
    assert store.load(2)["a"].tolist() == [1.0, 1.0]  # round 2 trained again starts from round 1's state
    assert store.load(3)["a"].tolist() == [2.0, 2.0]
    store.prune(2)
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["client-state-00002.safetensors"]
    (tmp_path / "job" / "client-state-00002.safetensors").write_bytes(b"torn")
    with pytest.raises(InvalidInputError, match="unreadable"):
        store.load(3)


def _spec(algorithm: dict[str, object]) -> dict[str, object]:
    return {
        "name": f"personal-{algorithm['name']}",
        "task": "synthetic-vitals",
        "rounds": 2,
        "min_silos": 3,
        "algorithm": {"local_epochs": 2, "batch_size": 16, "learning_rate": 0.05, **algorithm},
    }


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "scaffold"},
        {"name": "moon", "options": {"mu": 1.0}},
        {"name": "ditto", "options": {"lambda": 0.5}},
        {"name": "perfedavg", "options": {"alpha": 0.02}},
        {"name": "fedavg", "personal": ["head.*"]},
    ],
    ids=["scaffold", "moon", "ditto", "perfedavg", "fedper"],
)
def test_a_job_runs_with_silo_state(sqlite_coordinator: Coordinator, tmp_path: Path, algorithm: dict) -> None:  # type: ignore[type-arg]
    agents = in_process_agents(sqlite_coordinator, tmp_path, "synthetic-vitals", 120)
    status = run_job(sqlite_coordinator, agents, parse_job_spec(_spec(algorithm)))
    assert status.state == JobState.COMPLETED, status.reason
    train_rounds = [r for r in status.rounds if r.kind == RoundKind.TRAIN]
    folders = [tmp_path / f"silo-{i}" / "jobs" / status.id for i in range(3)]
    states = [load_file(str(path)) for folder in folders for path in folder.glob("client-state-*.safetensors")]
    assert len(states) == (0 if algorithm["name"] == "perfedavg" else 3)  # older rounds' states were pruned
    final = load_file(str(sqlite_coordinator.artifacts.checkpoint_path(status.id, 2)))
    if algorithm["name"] == "scaffold":
        controls = [t for n, t in final.items() if n.startswith(CONTROL)]
        assert controls and any(bool(t.abs().sum() > 0) for t in controls)  # c moved away from zero
        assert all(any(n.startswith("scaffold.own/") for n in s) for s in states)
    if algorithm["name"] in ("ditto", "perfedavg"):
        assert all("personal_eval_accuracy" in r.metrics for r in train_rounds)
    if algorithm["name"] == "ditto":
        assert all(any(n.startswith("ditto.personal/") for n in s) for s in states)
    if algorithm["name"] == "moon":
        assert all(any(n.startswith("moon.previous/") for n in s) for s in states)
    if "personal" in algorithm:
        assert not [n for n in final if n.startswith("head.")]  # the heads never reached the coordinator
        heads = [s["personal/head.weight"] for s in states]
        assert not torch.equal(heads[0], heads[1])  # each silo trained its own


def test_training_a_round_again_gives_the_same_delta_and_state(tmp_path: Path) -> None:
    """A crash after the state was saved but before the upload: the round trains again from the same state."""
    data = tmp_path / "vitals.safetensors"
    save_dataset(generate("synthetic-vitals", 60, 0, 1, seed=1), data)
    trainer = LocalTrainer(resolve_device("cpu"), {"synthetic-vitals": data}, 0.2)
    spec = parse_job_spec({**_spec({"name": "scaffold"}), "min_silos": 1})
    tensors = initial_tensors(spec, build_job_model(spec))
    checkpoint = tmp_path / "global.safetensors"
    save_file(tensors, str(checkpoint))
    manifest = [TensorSpec(n, "F32", tuple(t.shape)) for n, t in sorted(tensors.items())]
    info = CheckpointInfo("j", 1, checkpoint.stat().st_size, sha256_file(checkpoint))
    task = RoundTask("j", 2, RoundKind.TRAIN, spec, info, manifest, deadline_seconds=60)
    store = JobStateStore(tmp_path / "state")
    store.save(1, {f"scaffold.own/{n}": torch.full(t.shape, 0.01) for n, t in tensors.items() if "/" not in n})
    first = trainer.train(task, checkpoint, tmp_path / "d1.safetensors", job_state=store)
    state = load_file(str(tmp_path / "state" / "client-state-00002.safetensors"))
    second = trainer.train(task, checkpoint, tmp_path / "d2.safetensors", job_state=store)
    assert first.sha256 == second.sha256
    again = load_file(str(tmp_path / "state" / "client-state-00002.safetensors"))
    assert state.keys() == again.keys() and all(torch.equal(state[n], again[n]) for n in state)


def _moon_round(state: dict[str, torch.Tensor], mu: float) -> tuple[nn.Module, RoundContext]:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(3, 4))
    model.add_module("head", nn.Linear(4, 2))
    model = model.double()
    rng = np.random.default_rng(1)
    data = ArrayDataset(rng.normal(size=(16, 3)), rng.integers(0, 2, size=16))  # type: ignore[arg-type]
    context = RoundContext(global_tensors={}, extras={}, state=dict(state))
    entry = get_algorithm("moon")
    client = client_half(entry, entry.resolve_options({"mu": mu, "optimizer": "sgd"}))
    client.begin(model, context)
    client.train(
        model, data, LocalSettings(local_epochs=2, batch_size=8, learning_rate=LR, seed=0), torch.device("cpu")
    )
    client.finish(model, context)
    return model, context


def test_moon_is_fedavg_until_it_has_a_previous_model_or_with_mu_zero() -> None:
    first, context = _moon_round({}, mu=1.0)
    plain, _ = _moon_round({}, mu=0.0)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), plain.parameters(), strict=True))
    previous = {name: value + 0.3 for name, value in context.state.items()}  # a different previous model
    pulled, _ = _moon_round(previous, mu=1.0)
    unpulled, _ = _moon_round(previous, mu=0.0)
    assert all(torch.equal(a, b) for a, b in zip(unpulled.parameters(), plain.parameters(), strict=True))
    assert not torch.equal(pulled.body.weight, plain.body.weight)  # the contrastive term moved the body
    assert sorted(context.state) == [
        f"moon.previous/{n}" for n in ("body.bias", "body.weight", "head.bias", "head.weight")
    ]


@pytest.mark.parametrize("samples", [2, 10, 33])
def test_perfedavg_splits_small_and_ragged_batches(samples: int) -> None:
    """Fewer samples than a batch (a skewed silo's share) and a last batch of one sample still train."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    rng = np.random.default_rng(1)
    data = ArrayDataset(rng.normal(size=(samples, 3)), rng.integers(0, 2, size=samples))  # type: ignore[arg-type]
    entry = get_algorithm("perfedavg")
    steps: list[tuple[int, int]] = []
    settings = LocalSettings(local_epochs=1, batch_size=32, learning_rate=LR, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    client_half(entry, entry.resolve_options({})).train(
        model, data, settings, torch.device("cpu"), lambda step, total, _loss: steps.append((step, total))
    )
    assert steps and steps[-1][0] == steps[-1][1]  # progress reaches its total
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
