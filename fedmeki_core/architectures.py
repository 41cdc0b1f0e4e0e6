"""The model registry: architecture names, defaults and sizes, without torch; `fedmeki_core.models` builds them."""

from __future__ import annotations

import itertools
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
    # A hospital's table (tasks tabular, tabular-multiclass, tabular-regression): num_features is the width its schema
    # encodes (`fedmeki data import` prints it), num_classes its label's levels (1 for a regression). Logistic
    # (softmax) regression, linear regression, and an MLP for interactions a linear model cannot draw.
    "tabular-logistic": {"num_features": 8, "num_classes": 2},
    "tabular-linear": {"num_features": 8, "num_classes": 1},
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
    "tabular-linear": frozenset({"table"}),
    "tabular-mlp": frozenset({"table"}),
    "causal-lm": frozenset({"text"}),
    "image-classifier": frozenset({"xray"}),
}

# Each config key's range, inclusive (dropout: [0, 1)), checked at submission with the widths each head count
# must divide and the parameter cap below: a model no hospital could build is refused at the door.
CONFIG_RANGES: dict[str, tuple[float, float]] = {
    "hidden_size": (1, 8192),
    "num_layers": (1, 96),
    "num_heads": (1, 256),
    "intermediate_size": (1, 65536),
    "dropout": (0.0, 1.0),
    "image_size": (8, 1024),
    "patch_size": (1, 256),
    "image_hidden": (1, 8192),
    "image_layers": (1, 96),
    "image_heads": (1, 256),
    "image_intermediate": (1, 65536),
    "ecg_channels": (1, 4096),
    "ehr_width": (2, 8192),
    "ehr_heads": (1, 256),
    "token_dim": (1, 8192),
    "channels": (1, 1024),
    "depth": (1, 8),
    "levels": (1, 8),
    "num_features": (1, 65536),
    "num_classes": (1, 4096),
    "max_length": (1, 32768),  # causal-lm: tokens of prompt and answer
}
# (divisor, dividend): attention heads split a width evenly, patches tile an image.
DIVIDES = (
    ("num_heads", "hidden_size"),
    ("image_heads", "image_hidden"),
    ("ehr_heads", "ehr_width"),
    ("patch_size", "image_size"),
)
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32 weights: the most any job's model may hold
_EHR_FEATURES = 48  # fedmeki_core.models.encoders.EHR_FEATURES, without importing torch


def estimated_parameters(architecture: str, config: dict[str, Any]) -> int:
    """The parameters of an architecture's model under `config` (defaults filled in), from its largest terms,
    computed from the numbers alone (no allocation, no torch); a task's input size and heads are left out."""
    if architecture in PRETRAINED_ARCHITECTURES:
        return 0  # the base stays at the silos; what trains is bounded by the LoRA spec and each silo's budget
    c = {**ARCHITECTURES[architecture], **config}
    if architecture == "tiny-transformer":
        h, i = int(c["hidden_size"]), int(c["intermediate_size"])
        return int(c["num_layers"]) * (4 * h * h + 2 * h * i + 9 * h + i)
    if architecture.startswith("tabular-"):
        width, classes = int(c["num_features"]), int(c["num_classes"])
        if architecture in ("tabular-logistic", "tabular-linear"):
            return (width + 1) * classes
        hidden, depth = int(c["hidden_size"]), int(c["num_layers"])
        return (width + 1) * hidden + (depth - 1) * (hidden + 1) * hidden + (hidden + 1) * classes
    if architecture == "ct-classifier":
        layers: list[int] = [1, *(int(c["channels"]) * 2**level for level in range(int(c["depth"])))]
        return sum(27 * a * b + 3 * b for a, b in itertools.pairwise(layers))
    if architecture == "unet":
        widths: list[int] = [int(c["channels"]) * 2**level for level in range(int(c["levels"]))]
        down = sum(9 * (a * b + b * b) for a, b in zip([1, *widths], widths, strict=False))
        up = sum(9 * ((a + b) * a + a * a) for a, b in itertools.pairwise(widths))
        return down + up
    ih, ii, token = int(c["image_hidden"]), int(c["image_intermediate"]), int(c["token_dim"])
    patch, patches = int(c["patch_size"]), (int(c["image_size"]) // int(c["patch_size"])) ** 2
    image = patch * patch * ih + (patches + 2) * ih + int(c["image_layers"]) * (4 * ih * ih + 2 * ih * ii) + ih * token
    ecg_channels, ehr = int(c["ecg_channels"]), int(c["ehr_width"])
    ecg = 7 * 12 * ecg_channels + 7 * ecg_channels * ecg_channels + ecg_channels * token
    ehr_params = _EHR_FEATURES * ehr + 12 * ehr * ehr + ehr * token
    return image + ecg + ehr_params


__all__ = [
    "ARCHITECTURES",
    "CONFIG_RANGES",
    "DIVIDES",
    "MAX_PARAMETERS",
    "MODALITIES",
    "PRETRAINED_ARCHITECTURES",
    "estimated_parameters",
]
