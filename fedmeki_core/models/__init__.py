"""The model registry. Names and defaults live here without torch; `fedmeki_core.models.build` builds them."""

from __future__ import annotations

from typing import Any

_FEDMEKI_DEFAULTS: dict[str, Any] = {
    # DeiT-tiny sized image encoder over 224 x 224 grey X-rays (16 x 16 patches, 197 tokens x 192).
    "image_size": 224,
    "patch_size": 16,
    "image_hidden": 192,
    "image_layers": 12,
    "image_heads": 3,
    "image_intermediate": 768,
    "ecg_channels": 64,
    "ehr_width": 512,
    "ehr_heads": 8,
    "token_dim": 192,  # the width of every encoder's output tokens
    "dropout": 0.0,
}

ARCHITECTURES: dict[str, dict[str, Any]] = {
    # A small transformer encoder (BERT layers from a transformers config) over a sequence of feature
    # vectors, mean-pooled into a classification head.
    "tiny-transformer": {
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 2,
        "intermediate_size": 64,
        "dropout": 0.0,
    },
    # FedMEKI's modality encoders (X-ray ViT, ECG CNN, EHR transformer) and a head per training task.
    "fedmeki-encoders": _FEDMEKI_DEFAULTS,
    # The same at a size that trains in seconds on a CPU: tests and the demo.
    "fedmeki-encoders-tiny": {
        **_FEDMEKI_DEFAULTS,
        "image_size": 32,
        "patch_size": 4,
        "image_hidden": 32,
        "image_layers": 1,
        "image_heads": 2,
        "image_intermediate": 64,
        "ecg_channels": 16,
        "ehr_width": 32,
        "ehr_heads": 2,
        "token_dim": 32,
    },
    # PPPML-HMI: a 3D CNN over CT volumes (healthy vs patient) and a 2D U-Net for infection masks on slices.
    "ct-classifier": {"channels": 8, "depth": 3},
    "unet": {"channels": 8, "levels": 3},
    # A hospital's table (tasks tabular, tabular-multiclass): num_features is the width its schema encodes
    # (`fedmeki data import` prints it), num_classes its label's levels. Logistic (softmax) regression, and an MLP
    # for interactions a linear model cannot draw.
    "tabular-logistic": {"num_features": 8, "num_classes": 2},
    "tabular-mlp": {"num_features": 8, "num_classes": 2, "hidden_size": 32, "num_layers": 1, "dropout": 0.0},
    # A pretrained base from each silo's own folder (model.pretrained), with LoRA adapters and heads that train:
    # a causal LM for instruction tuning, an image classifier (ViT/DeiT) with a head of the task's class count.
    "causal-lm": {"max_length": 256},  # tokens of prompt and answer together; longer examples are cut
    "image-classifier": {"image_size": 224},
}

PRETRAINED_ARCHITECTURES = frozenset({"causal-lm", "image-classifier"})

# The modalities each architecture can take as input.
MODALITIES: dict[str, frozenset[str]] = {
    "tiny-transformer": frozenset({"vitals", "ehr"}),
    "fedmeki-encoders": frozenset({"xray", "ecg", "ehr"}),
    "fedmeki-encoders-tiny": frozenset({"xray", "ecg", "ehr"}),
    "ct-classifier": frozenset({"ct-volume"}),
    "unet": frozenset({"ct-slice"}),
    "tabular-logistic": frozenset({"table"}),
    "tabular-mlp": frozenset({"table"}),
    "causal-lm": frozenset({"text"}),
    "image-classifier": frozenset({"xray"}),
}

__all__ = ["ARCHITECTURES", "MODALITIES", "PRETRAINED_ARCHITECTURES"]
