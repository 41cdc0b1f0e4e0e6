"""The injection model: frozen encoders and language model, trained projections and adapters, generated answers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.model_spec import ModelSpec
from fedmeki_core.models.build import build_model
from fedmeki_core.models.injection import (
    InjectionSettings,
    MoELoraLinear,
    build_injection_model,
    load_language_model,
    task_vocabulary,
)
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


def test_a_local_hugging_face_folder_serves_as_the_language_model(tmp_path: Path) -> None:
    """What a hospital's operator points the injector at: a causal LM saved with save_pretrained, read offline."""
    vocabulary = task_vocabulary(["yes", "no"])
    settings = InjectionSettings("tiny-llama", "lora", 4, 8, 2, 1, 4, 4)
    language_model, tokenizer = load_language_model(settings, vocabulary, seed=3)
    folder = tmp_path / "my-llm"
    language_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    encoders = build_model(ModelSpec(architecture="fedmeki-encoders-tiny"), "fedmeki")
    model = build_injection_model(
        encoders, dataclasses.replace(settings, language_model=str(folder)), vocabulary, 32, seed=0
    )
    series = torch.randn(4, 24, 48)
    loss = model.loss(series, Modality.EHR, ["mortality"] * 4, [""] * 4, ["yes", "no", "yes", "no"])
    assert torch.isfinite(loss)
    assert len(model.generate(series, Modality.EHR, ["mortality"] * 4, [""] * 4)) == 4
    frozen = dict(language_model.named_parameters())
    loaded = {n.removeprefix("language_model.base_model.model."): p for n, p in model.named_parameters()}
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(loaded[name.replace("down_proj.weight", "down_proj.base_layer.weight")], frozen[name])

    with pytest.raises(InvalidInputError, match="not a local Hugging Face model folder"):
        build_injection_model(
            encoders, dataclasses.replace(settings, language_model=str(tmp_path / "absent")), vocabulary, 32, seed=0
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_lora_routes_under_cuda_autocast(dtype: torch.dtype) -> None:
    # CUDA autocast runs the gate in half precision and its softmax in float32; the route must accept both.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    layer = MoELoraLinear(torch.nn.Linear(8, 8), experts=4, rank=2, alpha=4.0, top_k=2, gate_dim=4).cuda()
    layer.context = torch.randn(3, 4, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = layer(torch.randn(3, 5, 8, device="cuda"))
    out.float().sum().backward()
    assert out.shape == (3, 5, 8)
    assert layer.gate.weight.grad is not None and bool(torch.isfinite(layer.gate.weight.grad).all())
