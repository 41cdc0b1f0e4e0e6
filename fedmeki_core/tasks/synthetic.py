"""One entry point to the synthetic data of the tasks: a generator per task and their Bayes accuracies.

Every generator takes (num_samples, silo_index, num_silos, seed) and returns an `ArrayDataset` shaped as the task's
catalogue entry says; the X-ray ones also take image_size. The same arguments give the same data.
"""

from __future__ import annotations

from collections.abc import Callable

from fedmeki_core.errors import InvalidInputError, NotFoundError
from fedmeki_core.tasks import (
    synthetic_ct,
    synthetic_ecg,
    synthetic_ehr,
    synthetic_table,
    synthetic_vitals,
    synthetic_xray,
)
from fedmeki_core.tasks.catalog import RESIZABLE, LabelType, Modality, get_task
from fedmeki_core.tasks.dataset import ArrayDataset

GENERATORS: dict[str, Callable[..., ArrayDataset]] = {
    "lung-opacity": synthetic_xray.generate_lung_opacity,
    "covid-19": synthetic_xray.generate_covid_19,
    "enlarged-cardiomediastinum": synthetic_xray.generate_enlarged_cardiomediastinum,
    "medvqa": synthetic_xray.generate_medvqa,
    "ecg-abnormal": synthetic_ecg.generate_ecg_abnormal,
    "ecg-noise": synthetic_ecg.generate_ecg_noise,
    "mortality": synthetic_ehr.generate_mortality,
    "sepsis": synthetic_ehr.generate_sepsis,
    "synthetic-vitals": synthetic_vitals.generate,
    "xray-local-findings": synthetic_xray.generate_xray_local_findings,
    "ct-covid": synthetic_ct.generate_volumes,
    "ct-infection-segmentation": synthetic_ct.generate_slices,
    "tabular": synthetic_table.generate,
    "tabular-multiclass": synthetic_table.generate_multiclass,
    "tabular-regression": synthetic_table.generate_regression,
}


def generate(
    task_name: str, num_samples: int, silo_index: int, num_silos: int, seed: int = 0, image_size: int | None = None
) -> ArrayDataset:
    """`num_samples` samples of a task for silo `silo_index` of `num_silos`; image_size only matters for X-rays."""
    task = get_task(task_name)
    generator = GENERATORS.get(task.name)
    if generator is None:
        raise NotFoundError(f"task {task_name!r} has no synthetic generator; those with one: {', '.join(GENERATORS)}")
    if task.modality in RESIZABLE and image_size is not None:
        return generator(num_samples, silo_index, num_silos, seed=seed, image_size=image_size)
    return generator(num_samples, silo_index, num_silos, seed=seed)


def bayes_accuracy(
    task_name: str, num_samples: int = 10_000, silo_index: int = 0, num_silos: int = 1, seed: int = 0
) -> float:
    """The best accuracy any classifier can reach on a binary task's synthetic data (default label noise).

    X-ray, ECG and CT: 1 - label_noise, since findings are rendered visibly. EHR: E[max(p, 1 - p)] over the risks of
    the `num_samples` patients that `generate` draws for the same silo and seed.
    """
    task = get_task(task_name)
    # The demo's vitals task has a rule-based label with noise of its own; no closed form here.
    if task.name not in GENERATORS or task.label_type != LabelType.BINARY or task.modality == Modality.VITALS:
        raise InvalidInputError(f"task {task_name!r} is not a binary task with a synthetic generator")
    if task.modality == Modality.XRAY:
        return synthetic_xray.bayes_accuracy()
    if task.modality == Modality.ECG:
        return synthetic_ecg.bayes_accuracy()
    if task.modality == Modality.CT_VOLUME:
        return synthetic_ct.volume_bayes_accuracy()
    risk = synthetic_ehr.mortality_risk if task.name == "mortality" else synthetic_ehr.sepsis_risk
    return synthetic_ehr.bayes_accuracy(risk(num_samples, silo_index, num_silos, seed))
