"""Synthetic ICU records (hourly, 48 standardised clinical features) for the mortality and sepsis tasks.

Hidden courses drive every feature through a fixed table of physiological loadings: illness severity (MAP and GCS
fall, lactate and heart rate rise), organ dysfunction (creatinine, bilirubin rise, platelets fall) and the infection
response (temperature, WBC, lactate, respiratory rate, CRP rise). Each patient adds a personal baseline and
autocorrelated noise, each silo a calibration offset; labs are measured rarely, vitals often, and gaps are filled
forward (then with 0, the population mean). Labels are drawn from the generator's own risk p, so the Bayes accuracy
given the hidden state is E[max(p, 1 - p)], an upper bound for any classifier of the features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmeki_core.tasks.dataset import ArrayDataset, FloatArray

Array = np.ndarray[Any, np.dtype[np.float64]]
BoolArray = np.ndarray[Any, np.dtype[np.bool_]]


@dataclass(frozen=True)
class Feature:
    name: str
    severity: float  # loading on the illness-severity course
    organ: float  # on organ dysfunction
    infection: float  # on the infection response
    missing: float  # share of hours without a measurement


# fmt: off
FEATURES: tuple[Feature, ...] = (
    Feature("heart_rate", 0.6, 0.0, 0.6, 0.05),
    Feature("systolic_bp", -0.6, -0.2, -0.2, 0.1),
    Feature("diastolic_bp", -0.5, -0.2, -0.2, 0.1),
    Feature("mean_arterial_pressure", -0.7, -0.3, -0.3, 0.1),
    Feature("respiratory_rate", 0.6, 0.0, 0.6, 0.1),
    Feature("spo2", -0.6, -0.2, 0.0, 0.1),
    Feature("temperature", 0.1, 0.0, 1.0, 0.3),
    Feature("gcs_total", -0.7, -0.4, 0.0, 0.5),
    Feature("gcs_eye", -0.5, -0.3, 0.0, 0.5),
    Feature("gcs_motor", -0.6, -0.3, 0.0, 0.5),
    Feature("gcs_verbal", -0.6, -0.3, 0.0, 0.5),
    Feature("fio2", 0.6, 0.2, 0.0, 0.4),
    Feature("peep", 0.5, 0.1, 0.0, 0.5),
    Feature("tidal_volume", 0.0, 0.0, 0.0, 0.5),
    Feature("urine_output", -0.6, -0.5, 0.0, 0.3),
    Feature("central_venous_pressure", 0.2, 0.0, 0.0, 0.6),
    Feature("capillary_refill", 0.4, 0.1, 0.1, 0.7),
    Feature("weight", 0.0, 0.0, 0.0, 0.9),
    Feature("lactate", 0.8, 0.3, 0.8, 0.7),
    Feature("creatinine", 0.5, 0.8, 0.0, 0.8),
    Feature("bun", 0.5, 0.6, 0.0, 0.8),
    Feature("wbc", 0.3, 0.0, 0.9, 0.8),
    Feature("hemoglobin", -0.3, 0.0, 0.0, 0.8),
    Feature("hematocrit", -0.3, 0.0, 0.0, 0.8),
    Feature("platelets", -0.4, -0.7, -0.2, 0.8),
    Feature("bilirubin", 0.3, 0.8, 0.0, 0.85),
    Feature("alt", 0.2, 0.4, 0.0, 0.85),
    Feature("ast", 0.3, 0.4, 0.0, 0.85),
    Feature("alkaline_phosphatase", 0.1, 0.2, 0.0, 0.85),
    Feature("albumin", -0.4, -0.2, 0.0, 0.9),
    Feature("glucose", 0.4, 0.0, 0.2, 0.6),
    Feature("sodium", 0.1, 0.0, 0.0, 0.8),
    Feature("potassium", 0.3, 0.3, 0.0, 0.8),
    Feature("chloride", 0.0, 0.0, 0.0, 0.8),
    Feature("bicarbonate", -0.6, -0.3, -0.2, 0.8),
    Feature("anion_gap", 0.6, 0.3, 0.2, 0.8),
    Feature("calcium", -0.2, 0.0, 0.0, 0.85),
    Feature("magnesium", 0.0, 0.0, 0.0, 0.85),
    Feature("phosphate", 0.3, 0.3, 0.0, 0.85),
    Feature("ph", -0.7, -0.2, -0.2, 0.7),
    Feature("pco2", 0.2, 0.0, 0.0, 0.7),
    Feature("po2", -0.5, 0.0, 0.0, 0.7),
    Feature("base_excess", -0.6, -0.2, -0.2, 0.7),
    Feature("inr", 0.3, 0.6, 0.0, 0.85),
    Feature("ptt", 0.2, 0.4, 0.0, 0.85),
    Feature("troponin", 0.4, 0.0, 0.0, 0.9),
    Feature("crp", 0.2, 0.0, 1.0, 0.9),
    Feature("procalcitonin", 0.2, 0.1, 1.0, 0.9),
)
# fmt: on
FEATURE_NAMES = tuple(feature.name for feature in FEATURES)
_LOADINGS = np.array([[f.severity, f.organ, f.infection] for f in FEATURES]).T  # [3 courses, 48 features]
_MISSING = np.array([f.missing for f in FEATURES])

MORTALITY_HOURS, SEPSIS_HOURS = 24, 168
MORTALITY_SLOPE, MORTALITY_BIAS = 2.0, 0.0  # risk = sigmoid(slope * severity + bias)
SEPSIS_SLOPE, SEPSIS_BIAS = 2.5, 1.5  # given infection, risk = sigmoid(slope * organ dysfunction + bias)
_SITE_SEED = 20250301  # a silo's lab calibration is the same for every seed
_STREAMS = {"mortality": 301, "sepsis": 302}


def _sigmoid(x: Array) -> Array:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float64)


def _silo_shift(silo_index: int, num_silos: int) -> float:
    """Silos range from healthier to sicker case mixes: the severity mean moves from -0.5 to +0.5."""
    return -0.5 + (silo_index + 0.5) / max(num_silos, 1)


def site_offset(silo_index: int) -> Array:
    """[48]: how a silo's devices and labs read, on the standardised scale."""
    return np.random.default_rng([_SITE_SEED, silo_index]).normal(scale=0.2, size=len(FEATURES))


def bayes_accuracy(risk: Array) -> float:
    """E[max(p, 1 - p)]: the accuracy of the classifier that knows each patient's risk."""
    return float(np.mean(np.maximum(risk, 1.0 - risk)))


def _autocorrelated_noise(rng: np.random.Generator, shape: tuple[int, int, int], rho: float = 0.7) -> Array:
    """AR(1) along time (axis 1), stationary sd 0.35: readings drift, they do not jump hour to hour."""
    innovations = rng.normal(scale=0.35 * np.sqrt(1.0 - rho**2), size=shape)
    noise = np.empty(shape)
    noise[:, 0] = rng.normal(scale=0.35, size=(shape[0], shape[2]))
    for hour in range(1, shape[1]):
        noise[:, hour] = rho * noise[:, hour - 1] + innovations[:, hour]
    return noise


def forward_fill(values: Array, observed: BoolArray) -> Array:
    """Carry each feature's last measurement forward in time (axis 1); 0 before the first one."""
    hours = np.arange(values.shape[1])[None, :, None]
    last = np.maximum.accumulate(np.where(observed, hours, -1), axis=1)
    filled = np.take_along_axis(values, np.maximum(last, 0), axis=1)
    return np.asarray(np.where(last >= 0, filled, 0.0), dtype=np.float64)


def observe(rng: np.random.Generator, courses: Array, silo_index: int) -> FloatArray:
    """[N, T, 48] charted values from [N, T, 3] hidden courses (severity, organ dysfunction, infection)."""
    n, hours, _ = courses.shape
    baseline = rng.normal(scale=0.5, size=(n, 1, len(FEATURES)))
    values = site_offset(silo_index) + baseline + courses @ _LOADINGS
    values = values + _autocorrelated_noise(rng, (n, hours, len(FEATURES)))
    observed = rng.random(values.shape) >= _MISSING
    return forward_fill(values, observed).astype(np.float32)


@dataclass(frozen=True)
class MortalityLatents:
    severity: Array
    organ: Array
    risk: Array


def _mortality_latents(rng: np.random.Generator, n: int, silo_index: int, num_silos: int) -> MortalityLatents:
    severity = rng.normal(_silo_shift(silo_index, num_silos), 1.0, n)
    organ = 0.6 * severity + 0.8 * rng.normal(size=n)
    return MortalityLatents(severity, organ, _sigmoid(MORTALITY_SLOPE * severity + MORTALITY_BIAS))


def mortality_risk(num_samples: int, silo_index: int, num_silos: int, seed: int = 0) -> Array:
    """The death probability of each patient `generate_mortality` draws with the same arguments."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["mortality"]])
    return _mortality_latents(rng, num_samples, silo_index, num_silos).risk


def generate_mortality(num_samples: int, silo_index: int, num_silos: int, seed: int = 0) -> ArrayDataset:
    """The first 24 hours; label 1 (death) ~ Bernoulli(sigmoid(2 * severity)). The sick get sicker over the day."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["mortality"]])
    latents = _mortality_latents(rng, num_samples, silo_index, num_silos)
    progress = np.linspace(0.6, 1.4, MORTALITY_HOURS)[None, :]
    courses = np.stack(
        [
            latents.severity[:, None] * progress,
            np.repeat(latents.organ[:, None], MORTALITY_HOURS, axis=1),
            np.zeros((num_samples, MORTALITY_HOURS)),
        ],
        axis=-1,
    )
    labels = (rng.random(num_samples) < latents.risk).astype(np.int64)
    return ArrayDataset(observe(rng, courses, silo_index), labels)


@dataclass(frozen=True)
class SepsisLatents:
    severity: Array
    organ: Array
    infected: BoolArray
    onset: Array  # hour the infection response starts
    response: Array  # its strength
    risk: Array


def _sepsis_latents(rng: np.random.Generator, n: int, silo_index: int, num_silos: int) -> SepsisLatents:
    """Sepsis is infection plus organ dysfunction (Sepsis-3): related to, but not the same as, mortality's severity."""
    severity = rng.normal(0.5 * _silo_shift(silo_index, num_silos), 1.0, n)
    organ = 0.6 * severity + 0.8 * rng.normal(size=n)
    infected = rng.random(n) < 0.2 + 0.6 * (silo_index + 0.5) / max(num_silos, 1)
    onset = rng.uniform(12.0, SEPSIS_HOURS - 24.0, n)
    response = rng.uniform(1.0, 2.0, n)
    risk = np.where(infected, _sigmoid(SEPSIS_SLOPE * organ + SEPSIS_BIAS), 0.0)
    return SepsisLatents(severity, organ, infected, onset, response, risk)


def sepsis_risk(num_samples: int, silo_index: int, num_silos: int, seed: int = 0) -> Array:
    """The sepsis probability of each patient `generate_sepsis` draws with the same arguments."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["sepsis"]])
    return _sepsis_latents(rng, num_samples, silo_index, num_silos).risk


def generate_sepsis(num_samples: int, silo_index: int, num_silos: int, seed: int = 0) -> ArrayDataset:
    """A week of data; infected patients' markers rise from a random onset hour, and label 1 needs an infection."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["sepsis"]])
    latents = _sepsis_latents(rng, num_samples, silo_index, num_silos)
    hours = np.arange(SEPSIS_HOURS)[None, :]
    # The response ramps up over about eight hours after onset and then stays.
    ramp = np.clip((hours - latents.onset[:, None]) / 8.0, 0.0, 1.0) * latents.infected[:, None]
    courses = np.stack(
        [
            latents.severity[:, None] + 0.5 * ramp,
            latents.organ[:, None] * (0.5 + 0.5 * ramp),
            latents.response[:, None] * ramp,
        ],
        axis=-1,
    )
    labels = (rng.random(num_samples) < latents.risk).astype(np.int64)
    return ArrayDataset(observe(rng, courses, silo_index), labels)
