"""Synthetic data laid out as a federation: each silo's private share and the injector's public share.

For each training task one population is generated, `public_fraction` of it goes to the injector (which splits it
again into fine-tuning and test data by its holdout_fraction) and the rest is partitioned among the silos, IID or
with Dirichlet label skew. Zero-shot tasks exist only at the injector, as much as a training task's public share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmeki_core.errors import InvalidInputError
from fedmeki_core.tasks.catalog import SUITES, LabelType, get_task
from fedmeki_core.tasks.dataset import ArrayDataset, save_dataset
from fedmeki_core.tasks.partition import dirichlet_partition, iid_partition, public_split
from fedmeki_core.tasks.synthetic import generate

PARTITIONS = ("iid", "dirichlet")


@dataclass(frozen=True)
class Federation:
    silos: tuple[dict[str, Path], ...]  # per silo: task -> dataset file
    injector: dict[str, Path]  # task -> dataset file (public share, and the zero-shot tasks)


def write_synthetic_federation(
    task: str,
    num_silos: int,
    samples: int,
    out: Path,
    *,
    image_size: int | None = None,
    partition: str = "iid",
    alpha: float = 0.5,
    public_fraction: float = 0.1,
    seed: int = 0,
) -> Federation:
    """Write `out/silo-<i>/<task>.safetensors` and `out/injector/<task>.safetensors`; `samples` per training task."""
    if partition not in PARTITIONS:
        raise InvalidInputError(f"partition {partition!r}: expected one of {', '.join(PARTITIONS)}")
    suite = SUITES.get(task)
    train = suite.train if suite else (get_task(task).name,)
    zero_shot = suite.zero_shot if suite else ()
    silos: tuple[dict[str, Path], ...] = tuple({} for _ in range(num_silos))
    injector: dict[str, Path] = {}
    public_size = 0
    for name in train:
        population = generate(name, samples, 0, 1, seed=seed, image_size=image_size)
        public, private = public_split(len(population), public_fraction, seed)
        public_size = max(public_size, len(public))
        if len(public):
            injector[name] = _save(population.subset(public), out / "injector" / f"{name}.safetensors")
        rest = population.subset(private)
        if partition == "dirichlet" and get_task(name).label_type == LabelType.BINARY:
            shares = dirichlet_partition(rest.labels, num_silos, alpha, seed)
        else:
            shares = iid_partition(len(rest), num_silos, seed)
        for index, share in enumerate(shares):
            silos[index][name] = _save(rest.subset(share), out / f"silo-{index}" / f"{name}.safetensors")
    for name in zero_shot:
        data = generate(name, max(public_size, 2), 0, 1, seed=seed + 1, image_size=image_size)
        injector[name] = _save(data, out / "injector" / f"{name}.safetensors")
    return Federation(silos=silos, injector=injector)


def _save(data: ArrayDataset, path: Path) -> Path:
    save_dataset(data, path)
    return path
