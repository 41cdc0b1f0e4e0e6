"""The model registry. Names and defaults live here without torch; `fedmeki_core.models.build` builds them."""

from __future__ import annotations

from typing import Any

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
}

__all__ = ["ARCHITECTURES"]
