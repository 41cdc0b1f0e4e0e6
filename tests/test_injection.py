"""The injection model: frozen encoders and language model, trained projections and adapters, generated answers."""

from __future__ import annotations

import pytest
import torch

from fedmeki_core.jobspec import ModelSpec
from fedmeki_core.models.build import build_model
from fedmeki_core.models.injection import InjectionSettings, build_injection_model, task_vocabulary
from fedmeki_core.tasks import Modality


@pytest.mark.parametrize("adapter", ["moe-lora", "lora"])
def test_adapters_learn_to_answer_from_the_encoder_tokens(adapter: str) -> None:
    torch.manual_seed(0)
    encoders = build_model(ModelSpec(architecture="fedmeki-encoders-tiny"), "fedmeki")
    model = build_injection_model(
        encoders, InjectionSettings("tiny-llama", adapter, 8, 32, 12, 2, 8, 8), task_vocabulary([]), 32, seed=0
    )
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert any(name.startswith("encoders.") for name in frozen)
    assert all(not p.requires_grad for p in model._embeddings.parameters())
    series = torch.randn(128, 24, 48)
    labels = torch.rand(128) < 0.5
    series[:, :, :8] += 2.0 * (labels[:, None, None].float() * 2 - 1)  # the answer is in the data
    answers = ["yes" if y else "no" for y in labels.tolist()]
    before = model.generate(series, Modality.EHR, ["mortality"] * 128, [""] * 128)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    for _ in range(40):
        index = torch.randint(0, 128, (32,))
        loss = model.loss(series[index], Modality.EHR, ["mortality"] * 32, [""] * 32, [answers[i] for i in index])
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    after = model.generate(series, Modality.EHR, ["mortality"] * 128, [""] * 128)
    accuracy = sum(a == b for a, b in zip(after, answers, strict=True)) / 128
    assert accuracy >= 0.9
    assert accuracy > sum(a == b for a, b in zip(before, answers, strict=True)) / 128
    frozen_after = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen_after == frozen
