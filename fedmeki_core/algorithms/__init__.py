"""The one registry of FL algorithms: each entry has its options, a numpy server half and the import path of its
torch client half (in `fedmeki_core.training`, which this package never imports)."""

from __future__ import annotations

from fedmeki_core.algorithms.base import EXTRA_PREFIX, AlgorithmEntry, ServerAlgorithm
from fedmeki_core.algorithms.ditto import DITTO
from fedmeki_core.algorithms.fedavg import FEDAVG
from fedmeki_core.algorithms.fednova import FEDNOVA
from fedmeki_core.algorithms.fedprox import FEDPROX
from fedmeki_core.algorithms.moon import MOON
from fedmeki_core.algorithms.perfedavg import PERFEDAVG
from fedmeki_core.algorithms.scaffold import SCAFFOLD
from fedmeki_core.algorithms.server_optimizers import FEDADAGRAD, FEDADAM, FEDAVGM, FEDYOGI
from fedmeki_core.errors import NotFoundError
from fedmeki_core.option_types import shown

ALGORITHMS: dict[str, AlgorithmEntry] = {
    entry.name: entry
    for entry in (FEDAVG, FEDPROX, SCAFFOLD, MOON, FEDNOVA, FEDAVGM, FEDADAM, FEDYOGI, FEDADAGRAD, PERFEDAVG, DITTO)
}


def get_algorithm(name: str) -> AlgorithmEntry:
    try:
        return ALGORITHMS[name]
    except KeyError:
        known = ", ".join(sorted(ALGORITHMS))
        raise NotFoundError(f"unknown algorithm {shown(name)}; known algorithms: {known}") from None


__all__ = [
    "ALGORITHMS",
    "EXTRA_PREFIX",
    "AlgorithmEntry",
    "ServerAlgorithm",
    "get_algorithm",
]
