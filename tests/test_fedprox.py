"""FedProx's client half against a hand computation; its server half is FedAvg's."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedmeki_core.algorithms import get_algorithm
from fedmeki_core.errors import InvalidInputError
from fedmeki_core.jobspec import parse_job_spec
from fedmeki_core.models.build import build_job_model
from fedmeki_core.tasks.dataset import ArrayDataset
from fedmeki_core.tasks.synthetic import generate
from fedmeki_core.training import LocalSettings, RoundContext, client_half

LR, MU = 0.1, 0.5


def _setup() -> tuple[nn.Module, ArrayDataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    rng = np.random.default_rng(1)
    data = ArrayDataset(rng.normal(size=(64, 2, 3)), rng.integers(0, 2, size=64))  # type: ignore[arg-type]
    return model, data


def _train(name: str, model: nn.Module, data: ArrayDataset, mu: float, snapshots: list[list[torch.Tensor]]) -> None:
    entry = get_algorithm(name)
    options = entry.resolve_options({"optimizer": "sgd", **({"mu": mu} if name == "fedprox" else {})})
    settings = LocalSettings(local_epochs=1, batch_size=32, learning_rate=LR, seed=5)  # two SGD steps

    def progress(step: int, total: int, loss: float) -> None:
        snapshots.append([p.detach().clone() for p in model.parameters()])

    client = client_half(entry, options)
    _begin(client, model)
    client.train(model, data, settings, torch.device("cpu"), progress)


def test_the_proximal_term_pulls_the_second_step_back_towards_the_global_model() -> None:
    model, data = _setup()
    start = [p.detach().clone() for p in model.parameters()]
    avg, prox = copy.deepcopy(model), copy.deepcopy(model)
    avg_steps: list[list[torch.Tensor]] = []
    prox_steps: list[list[torch.Tensor]] = []
    _train("fedavg", avg, data, 0.0, avg_steps)
    _train("fedprox", prox, data, MU, prox_steps)
    # Step 1 starts at the global model, where the proximal gradient mu (w - w_g) is zero: both take the same step.
    for a, b in zip(avg_steps[0], prox_steps[0], strict=True):
        assert torch.equal(a, b)
    # Step 2 sees the same data gradient at the same w1, plus mu (w1 - w_g): w2 = w2_fedavg - lr mu (w1 - w_g).
    for w2_avg, w2_prox, w1, w_g in zip(avg_steps[1], prox_steps[1], avg_steps[0], start, strict=True):
        torch.testing.assert_close(w2_prox, w2_avg - LR * MU * (w1 - w_g), rtol=0, atol=1e-12)


def test_mu_zero_is_fedavg() -> None:
    model, data = _setup()
    avg, prox = copy.deepcopy(model), copy.deepcopy(model)
    _train("fedavg", avg, data, 0.0, [])
    _train("fedprox", prox, data, 0.0, [])
    for a, b in zip(avg.parameters(), prox.parameters(), strict=True):
        assert torch.equal(a, b)


def test_job_specs_validate_fedprox_options() -> None:
    base = {"name": "j", "task": "synthetic-vitals", "rounds": 1}
    spec = parse_job_spec({**base, "algorithm": {"name": "fedprox", "options": {"mu": 1e-6}}})
    assert spec.algorithm.options == {"mu": 1e-6}
    with pytest.raises(InvalidInputError, match="'mu' must be non-negative"):
        parse_job_spec({**base, "algorithm": {"name": "fedprox", "options": {"mu": -1.0}}})
    with pytest.raises(InvalidInputError, match="has no option 'momentum'"):
        parse_job_spec({**base, "algorithm": {"name": "fedprox", "options": {"momentum": 0.9}}})


def test_the_algorithms_command_lists_each_with_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    from fedmeki_core.app.cli import main

    assert main(["algorithms"]) == 0
    out = capsys.readouterr().out
    assert "fedavg" in out and "fedprox" in out and "mu=0.01" in out


def _begin(client: object, model: nn.Module) -> None:
    """The round starts: the model holds the global weights."""
    context = RoundContext(
        global_tensors={n: p.detach().clone() for n, p in model.named_parameters()}, extras={}, state={}
    )
    client.begin(model, context)  # type: ignore[attr-defined]


@pytest.mark.parametrize("scope", ["all", "task"])
def test_a_task_scoped_proximal_term_leaves_the_other_modalities_alone(scope: str) -> None:
    spec = parse_job_spec(
        {"name": "j", "task": "fedmeki", "rounds": 1, "model": {"architecture": "fedmeki-encoders-tiny"}}
    )
    model = build_job_model(spec)
    entry = get_algorithm("fedprox")
    client = client_half(entry, entry.resolve_options({"mu": 10.0, "optimizer": "sgd", "proximal_scope": scope}))
    _begin(client, model)
    xray = model.encoders["xray"]
    with torch.no_grad():  # an X-ray task trained earlier in the round moved its encoder away from w_global
        for p in xray.parameters():
            p.add_(0.1)
    moved = [p.detach().clone() for p in xray.parameters()]
    settings = LocalSettings(local_epochs=1, batch_size=16, learning_rate=LR, seed=0)
    client.train(model.for_task("ecg-abnormal"), generate("ecg-abnormal", 32, 0, 1), settings, torch.device("cpu"))
    pulled_back = [bool((m - p).abs().max() > 0) for p, m in zip(xray.parameters(), moved, strict=True)]
    # "all": the ECG task's term pulls the X-ray encoder back towards w_global too; "task": only its own tensors.
    assert all(pulled_back) if scope == "all" else not any(pulled_back)
