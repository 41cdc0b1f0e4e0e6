"""Synthetic 12-lead ECGs from a cardiac dipole, and the two FedMEKI ECG tasks drawn from them.

Each beat is a sum of Gaussian waves (P, Q, R, S, T), each pointing the heart's electrical dipole in its own
direction (x: patient's left, y: feet, z: anterior). The leads project that one dipole: I and II on the frontal
plane, III, aVR, aVL and aVF derived from them (Einthoven and Goldberger), V1..V6 on the horizontal plane. So the
leads agree with each other as real ones do, and an abnormality (ST shift, wide QRS, atrial fibrillation, inverted T)
shows in the leads that face it. 10 s at 100 Hz in millivolts, baseline 0, with a little electrode noise per lead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmeki_core.tasks.dataset import ArrayDataset

Array = np.ndarray[Any, np.dtype[np.float64]]

RATE_HZ = 100
NUM_SAMPLES = 1000
LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LABEL_NOISE = 0.08
ABNORMALITIES = ("st-elevation", "st-depression", "wide-qrs", "atrial-fibrillation", "t-inversion")
NOISE_KINDS = ("none", "baseline drift", "static noise", "burst noise")
ELECTRODE_NOISE_MV = 0.01
_STREAMS = {"ecg-abnormal": 201, "ecg-noise": 202}

_LEAD_I = np.array([1.0, 0.0, 0.0])
_LEAD_II = np.array([0.5, np.sqrt(3.0) / 2.0, 0.0])  # +60 degrees on the frontal plane
_PRECORDIAL = np.array(
    [
        [-0.5, 0.1, 0.85],  # V1: right of the sternum, faces the right ventricle
        [-0.1, 0.1, 1.0],
        [0.3, 0.1, 0.95],
        [0.6, 0.15, 0.75],
        [0.85, 0.15, 0.4],
        [0.95, 0.15, 0.05],  # V6: mid-axillary, faces the lateral wall
    ]
)
_PRECORDIAL_GAIN = 1.5  # chest electrodes sit closer to the heart than the limb leads
# Rows project the dipole onto the 12 leads; the derived limb leads are exact combinations of I and II.
LEAD_MATRIX = np.vstack(
    [
        _LEAD_I,
        _LEAD_II,
        _LEAD_II - _LEAD_I,  # III
        -(_LEAD_I + _LEAD_II) / 2.0,  # aVR
        _LEAD_I - _LEAD_II / 2.0,  # aVL
        _LEAD_II - _LEAD_I / 2.0,  # aVF
        _PRECORDIAL_GAIN * _PRECORDIAL / np.linalg.norm(_PRECORDIAL, axis=1, keepdims=True),
    ]
)


@dataclass(frozen=True)
class Wave:
    """A Gaussian bump of the dipole at a fixed delay from each R peak."""

    delay: float  # seconds after the R peak (negative: before it)
    width: float  # seconds (the Gaussian's sigma)
    amplitude: float  # millivolts
    direction: Array  # unit vector (x left, y feet, z anterior)


def _unit(*xyz: float) -> Array:
    vector = np.array(xyz, dtype=np.float64)
    return np.asarray(vector / np.linalg.norm(vector), dtype=np.float64)


NORMAL_BEAT = {
    "P": Wave(-0.17, 0.022, 0.15, _unit(0.45, 0.85, 0.25)),
    "Q": Wave(-0.035, 0.010, 0.12, _unit(-0.5, -0.1, 0.85)),  # the septum depolarises left to right
    "R": Wave(0.0, 0.016, 1.2, _unit(0.7, 0.55, -0.25)),
    "S": Wave(0.04, 0.014, 0.4, _unit(-0.35, -0.6, -0.7)),
    "T": Wave(0.30, 0.055, 0.35, _unit(0.6, 0.6, 0.35)),  # concordant with R: repolarisation runs backwards
}


@dataclass(frozen=True)
class Rhythm:
    """One recording's beats: R-peak times and whether each beat has a P wave."""

    r_peaks: Array
    has_p: bool
    fibrillation_mv: float = 0.0  # amplitude of atrial fibrillatory waves


def positive_share(silo_index: int, num_silos: int) -> float:
    """Label skew: silos range from mostly-negative to mostly-positive populations."""
    return 0.2 + 0.6 * (silo_index + 0.5) / max(num_silos, 1)


def bayes_accuracy(label_noise: float = LABEL_NOISE) -> float:
    """The best accuracy any classifier reaches: abnormalities are visible, only the flipped labels are lost."""
    return 1.0 - label_noise


def _rotation(rng: np.random.Generator, scale: float) -> Array:
    """A small random rotation: each patient's heart sits at its own electrical axis."""
    ax, ay, az = rng.normal(scale=scale, size=3)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return np.asarray(rx @ ry @ rz, dtype=np.float64)


def sinus_rhythm(rng: np.random.Generator) -> Rhythm:
    """50-100 bpm with respiratory sinus arrhythmia; beats start before the window so it begins mid-rhythm."""
    rr = 60.0 / rng.uniform(50.0, 100.0)
    breath, phase = rng.uniform(0.2, 0.3), rng.uniform(0.0, 2.0 * np.pi)
    peaks = [-rng.uniform(0.0, rr) - 0.5]
    while peaks[-1] < NUM_SAMPLES / RATE_HZ + 0.5:
        t = peaks[-1]
        peaks.append(t + rr * (1.0 + 0.04 * np.sin(2.0 * np.pi * breath * t + phase) + 0.015 * rng.normal()))
    return Rhythm(np.array(peaks), has_p=True)


def fibrillation_rhythm(rng: np.random.Generator) -> Rhythm:
    """Atrial fibrillation: no P waves, irregularly irregular RR intervals, small fibrillatory waves."""
    rr = 60.0 / rng.uniform(60.0, 100.0)
    peaks = [-rng.uniform(0.0, rr) - 0.5]
    while peaks[-1] < NUM_SAMPLES / RATE_HZ + 0.5:
        peaks.append(peaks[-1] + rr * rng.uniform(0.55, 1.45))
    return Rhythm(np.array(peaks), has_p=False, fibrillation_mv=float(rng.uniform(0.04, 0.08)))


def _abnormal_beat(rng: np.random.Generator, kind: str) -> dict[str, Wave]:
    """The normal beat changed by one abnormality (atrial fibrillation changes the rhythm instead)."""
    beat = dict(NORMAL_BEAT)
    if kind == "st-elevation":
        # Transmural injury: the ST segment moves towards the injured wall (anterior or inferior).
        injury = _unit(0.1, 0.1, 1.0) if rng.random() < 0.5 else _unit(0.1, 1.0, 0.1)
        beat["ST"] = Wave(0.15, 0.06, float(rng.uniform(0.2, 0.35)), injury)
    elif kind == "st-depression":
        # Subendocardial ischaemia: the ST segment moves away from the lateral and inferior leads.
        beat["ST"] = Wave(0.15, 0.06, float(rng.uniform(0.15, 0.3)), _unit(-0.7, -0.5, -0.3))
    elif kind == "wide-qrs":
        # Bundle-branch block: slow ventricular conduction, a late terminal wave, discordant T.
        beat["R"] = replace(beat["R"], width=0.034)
        beat["S"] = replace(beat["S"], delay=0.08, width=0.03)
        terminal = _unit(-0.4, 0.0, 0.9) if rng.random() < 0.5 else _unit(0.6, -0.2, -0.8)
        beat["late"] = Wave(0.09, 0.02, 0.5, terminal)
        beat["T"] = replace(beat["T"], amplitude=-0.6 * beat["T"].amplitude)
    elif kind == "t-inversion":
        beat["T"] = replace(beat["T"], amplitude=-float(rng.uniform(0.2, 0.4)))
    return beat


def render(rng: np.random.Generator, beat: dict[str, Wave], rhythm: Rhythm) -> Array:
    """[12, 1000] millivolts: the beats' dipole projected onto the leads, plus electrode noise."""
    time = np.arange(NUM_SAMPLES) / RATE_HZ
    rotation, gain = _rotation(rng, 0.25), rng.uniform(0.7, 1.3)
    rr = np.diff(rhythm.r_peaks, append=rhythm.r_peaks[-1] + 0.8)
    dipole = np.zeros((3, NUM_SAMPLES))
    for name, wave in beat.items():
        if name == "P" and not rhythm.has_p:
            continue
        # Repolarisation comes sooner at fast rates (Bazett): the T wave's delay scales with sqrt(RR).
        delay = wave.delay * np.sqrt(rr / 0.8) if name == "T" else np.full_like(rr, wave.delay)
        centers = rhythm.r_peaks + delay
        shape = np.exp(-((time[None, :] - centers[:, None]) ** 2) / (2.0 * wave.width**2)).sum(axis=0)
        dipole += np.outer(rotation @ wave.direction, gain * wave.amplitude * shape)
    if rhythm.fibrillation_mv:
        rate, phase = rng.uniform(5.0, 7.0), rng.uniform(0.0, 2.0 * np.pi)
        wobble = np.sin(2.0 * np.pi * rate * time + phase + 0.8 * np.sin(2.0 * np.pi * 0.3 * time))
        dipole += np.outer(rotation @ NORMAL_BEAT["P"].direction, rhythm.fibrillation_mv * wobble)
    leads = LEAD_MATRIX @ dipole
    return np.asarray(leads + rng.normal(scale=ELECTRODE_NOISE_MV, size=leads.shape), dtype=np.float64)


def _record(rng: np.random.Generator, kind: str | None) -> Array:
    """One recording: normal sinus rhythm when `kind` is None, else the named abnormality."""
    rhythm = fibrillation_rhythm(rng) if kind == "atrial-fibrillation" else sinus_rhythm(rng)
    beat = NORMAL_BEAT if kind is None else _abnormal_beat(rng, kind)
    return render(rng, beat, rhythm)


def generate_ecg_abnormal(
    num_samples: int, silo_index: int, num_silos: int, seed: int = 0, label_noise: float = LABEL_NOISE
) -> ArrayDataset:
    """Label 1: one of ST elevation, ST depression, wide QRS, atrial fibrillation, inverted T; 0: sinus rhythm."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["ecg-abnormal"]])
    abnormal = rng.random(num_samples) < positive_share(silo_index, num_silos)
    kinds = rng.choice(ABNORMALITIES, num_samples)
    features = np.stack([_record(rng, str(k) if a else None) for a, k in zip(abnormal, kinds, strict=True)])
    labels = (abnormal ^ (rng.random(num_samples) < label_noise)).astype(np.int64)
    return ArrayDataset(features.astype(np.float32), labels)


def add_noise(rng: np.random.Generator, signal: Array, kind: str) -> Array:
    """`signal` with one kind of artefact on a random subset of 3 to 12 leads (ECG-QA's noise annotations)."""
    if kind == "none":
        return signal
    time = np.arange(NUM_SAMPLES) / RATE_HZ
    leads = rng.permutation(len(LEADS))[: rng.integers(3, len(LEADS) + 1)]
    noise = np.zeros((leads.size, NUM_SAMPLES))
    if kind == "baseline drift":
        # Breathing and electrode movement: a slow 0.1-0.5 Hz wander of a few tenths of a millivolt.
        frequency = rng.uniform(0.1, 0.5, (leads.size, 1))
        amplitude, phase = rng.uniform(0.3, 0.8, (leads.size, 1)), rng.uniform(0.0, 2.0 * np.pi, (leads.size, 1))
        noise = amplitude * np.sin(2.0 * np.pi * frequency * time[None, :] + phase)
    elif kind == "static noise":
        noise = rng.normal(size=noise.shape) * rng.uniform(0.08, 0.2, (leads.size, 1))
    else:  # burst noise: one to three short high-amplitude stretches, shared by the affected leads
        for _ in range(int(rng.integers(1, 4))):
            start, length = int(rng.integers(0, NUM_SAMPLES - 80)), int(rng.integers(20, 81))
            noise[:, start : start + length] += rng.normal(size=(leads.size, length)) * rng.uniform(0.5, 1.5)
    noisy = signal.copy()
    noisy[leads] += noise
    return noisy


def _noise_pair(rng: np.random.Generator, kind: str) -> tuple[str, str]:
    """An ECG-QA style question about the recording's noise and the answer the added artefact gives."""
    asked = ("baseline drift", "static noise", "burst noise", "any", "which")[int(rng.integers(5))]
    if asked == "which":
        question = ("Which noise does this ECG show?", "What kind of noise does this ECG have?")[int(rng.integers(2))]
        return question, kind
    if asked == "any":
        return "Does this ECG contain any noise?", "no" if kind == "none" else "yes"
    return f"Does this ECG contain {asked}?", "yes" if kind == asked else "no"


def generate_ecg_noise(num_samples: int, silo_index: int, num_silos: int, seed: int = 0) -> ArrayDataset:
    """Questions on the artefacts of an ECG (none, baseline drift, static noise, burst noise), answered exactly."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["ecg-noise"]])
    # Silos differ in how often their recordings carry artefacts, not in which kinds.
    noisy = rng.random(num_samples) < 0.35 + 0.5 * (silo_index + 0.5) / max(num_silos, 1)
    kinds = np.where(noisy, rng.choice(NOISE_KINDS[1:], num_samples), NOISE_KINDS[0])
    abnormal = rng.random(num_samples) < 0.3
    features, pairs = [], []
    for kind, sick in zip(kinds, abnormal, strict=True):
        clean = _record(rng, str(rng.choice(ABNORMALITIES)) if sick else None)
        features.append(add_noise(rng, clean, str(kind)))
        pairs.append(_noise_pair(rng, str(kind)))
    return ArrayDataset(
        np.stack(features).astype(np.float32),
        np.full(num_samples, -1, dtype=np.int64),
        questions=tuple(question for question, _ in pairs),
        answers=tuple(answer for _, answer in pairs),
    )
