"""The torch half of the FL algorithms: each algorithm's client half, and the local loop they share.

The registry (`fedmeki_core.algorithms`, numpy only, what the coordinator loads) names each client half by import
path ("module:factory"); only the silo agent loads one, through `client_half`. An import-linter contract keeps the
coordinator from importing this package, even inside a function.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, cast

from fedmeki_core.algorithms import AlgorithmEntry
from fedmeki_core.training.base import ClientAlgorithm, ClientHalf, LocalSettings, ProgressCallback, RoundContext


def client_half(entry: AlgorithmEntry, options: Mapping[str, Any]) -> ClientAlgorithm:
    """The client half of `entry` for a job's resolved algorithm options."""
    module, _, factory = entry.client.partition(":")
    if not module.startswith(f"{__name__}."):  # the registry is code, but a path out of this package is a bug
        raise ValueError(f"{entry.name}'s client half {entry.client!r} is not in {__name__}")
    return cast(ClientAlgorithm, getattr(importlib.import_module(module), factory)(options))


__all__ = ["ClientAlgorithm", "ClientHalf", "LocalSettings", "ProgressCallback", "RoundContext", "client_half"]
