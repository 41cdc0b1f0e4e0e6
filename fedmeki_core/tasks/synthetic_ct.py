"""Synthetic chest CT for the two PPPML-HMI workloads: patient-vs-healthy volumes and infection-masked slices.

A phantom chest (soft-tissue body ellipse, two dark lungs, bright spine and ribs, bright lung vessels, scanner
noise) in coordinates z, y, x in [-1, 1]: z runs from the lung apex (-1) to the base (+1), y from anterior (-1)
to posterior (+1). Infection shows as ground-glass opacity: soft blobs of raised density inside the lungs, biased
towards the periphery and the lower lobes. Silos differ in label balance (or infection prevalence) and in a
scanner intensity offset, so no silo's data looks like the whole population.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fedmeki_core.tasks.dataset import ArrayDataset

Array = np.ndarray[Any, np.dtype[np.float64]]
BoolArray = np.ndarray[Any, np.dtype[np.bool_]]
MaskArray = np.ndarray[Any, np.dtype[np.uint8]]

LABEL_NOISE = 0.05

AIR, LUNG, SOFT_TISSUE, BONE = 0.0, 0.12, 0.45, 0.9
NOISE_SIGMA = 0.025
VESSEL_PEAK = (0.25, 0.55)  # above the lung: overlaps the opacities' range, so intensity alone does not segment
OPACITY_PEAK = (0.15, 0.3)  # above the lung
PATIENT_OPACITIES = (2, 6)  # a patient volume has 2 to 5 opacities: never none, so the clean label is visible
OPACITY_WIDTH = (0.12, 0.25)  # the gaussian's sigma in-plane
OPACITY_HEIGHT = (0.2, 0.4)  # ... and along z
LESION_PEAK = (0.15, 0.3)  # a slice's infection: its peak above the lung
LESION_WIDTH = (0.06, 0.14)  # its blobs' sigma along x and along y
MASK_LEVEL = 0.5  # a pixel is infected where the opacity field reaches half of its peak


@dataclass(frozen=True)
class _Chest:
    """One patient's anatomy; the lungs' cross-section changes with z."""

    body_rx: float
    body_ry: float
    lung_rx: float
    lung_ry: float
    lung_cx: float
    lung_cy: float

    @staticmethod
    def sample(rng: np.random.Generator) -> _Chest:
        jitter = rng.normal(scale=0.03, size=4)
        return _Chest(
            body_rx=0.86 + jitter[0],
            body_ry=0.64 + jitter[1],
            lung_rx=0.27 + jitter[2] / 2,
            lung_ry=0.4 + jitter[3] / 2,
            lung_cx=0.4,
            lung_cy=-0.04,
        )

    def lung_scale(self, z: Array) -> Array:
        # Narrow at the apex, widest near the base, cut by the diaphragm's dome at the bottom.
        taper = 0.6 + 0.2 * (1.0 + z)
        dome = np.sqrt(1.0 - np.clip((z - 0.7) / 0.6, 0.0, 1.0) ** 2)
        return np.asarray(taper * dome, dtype=np.float64)

    def lung_ellipse(self, z: Array, side: float) -> tuple[float, float, Array, Array]:
        """Centre x, centre y, x radius, y radius of one lung (side -1 right, +1 left) at height z."""
        scale = self.lung_scale(z)
        return side * self.lung_cx, self.lung_cy, self.lung_rx * scale, self.lung_ry * scale

    def lungs(self, z: Array, y: Array, x: Array) -> BoolArray:
        inside = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=bool)
        for side in (-1.0, 1.0):
            cx, cy, ax, ay = self.lung_ellipse(z, side)
            inside |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0
        return inside

    def render(self, z: Array, y: Array, x: Array) -> tuple[Array, BoolArray]:
        """Grey levels of the anatomy without vessels or noise, and the lung mask."""
        shape = np.broadcast_shapes(z.shape, y.shape, x.shape)
        radius = np.sqrt((x / self.body_rx) ** 2 + (y / self.body_ry) ** 2)
        image = np.where(radius <= 1.0, SOFT_TISSUE, AIR) * np.ones(shape)
        angle = np.arctan2(y, x)
        ribs = (radius > 0.86) & (radius < 0.95) & (np.cos(14.0 * angle + 5.0 * z) > 0.2)
        spine = (x / 0.09) ** 2 + ((y - 0.78 * self.body_ry) / 0.1) ** 2 <= 1.0
        image = np.where(ribs | spine, BONE, image)
        lungs = self.lungs(z, y, x)
        return np.where(lungs, LUNG, image), lungs


def _grid(size: int) -> Array:
    return np.linspace(-1.0, 1.0, size)


def _lung_point(chest: _Chest, z: float, rng: np.random.Generator, peripheral: bool) -> tuple[float, float]:
    """A point (x, y) in a lung at height z; `peripheral` skews its radial position towards the pleura."""
    cx, cy, ax, ay = chest.lung_ellipse(np.asarray(z), float(rng.choice([-1.0, 1.0])))
    radius = 0.8 * (rng.beta(3.0, 1.3) if peripheral else np.sqrt(rng.random()))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    return float(cx + radius * ax * np.cos(angle)), float(cy + radius * ay * np.sin(angle))


def _lower_lobe_z(rng: np.random.Generator) -> float:
    """A height skewed towards the bases (mean +0.25), kept off the apex and the diaphragm's dome."""
    return float(np.clip(2.0 * rng.beta(2.5, 1.5) - 1.0, -0.9, 0.85))


def _vessels(chest: _Chest, z: float, y: Array, x: Array, rng: np.random.Generator) -> Array:
    """Bright, small, sharp dots in the lungs: vessels cut across by an axial plane."""
    image = np.zeros(np.broadcast_shapes(y.shape, x.shape))
    for _ in range(int(rng.integers(6, 14))):
        xc, yc = _lung_point(chest, z, rng, peripheral=False)
        width = rng.uniform(0.012, 0.025)
        image += rng.uniform(*VESSEL_PEAK) * np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2 * width**2))
    return image


def _silo_offset(silo_index: int, num_silos: int) -> float:
    """Each silo's scanner reads a little brighter or darker: from -0.03 to +0.03 across the silos."""
    return 0.06 * (silo_index / max(num_silos - 1, 1) - 0.5)


def _positive_share(silo_index: int, num_silos: int) -> float:
    """Label skew: silos range from mostly-healthy to mostly-patient populations."""
    return 0.2 + 0.6 * (silo_index + 0.5) / max(num_silos, 1)


def _finish(image: Array, offset: float, rng: np.random.Generator) -> Array:
    noisy = image + offset + rng.normal(scale=NOISE_SIGMA, size=image.shape)
    return np.clip(noisy, 0.0, 1.0)


def _opacities_3d(chest: _Chest, z: Array, y: Array, x: Array, rng: np.random.Generator) -> Array:
    field = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape))
    for _ in range(int(rng.integers(*PATIENT_OPACITIES))):
        zc = _lower_lobe_z(rng)
        xc, yc = _lung_point(chest, zc, rng, peripheral=True)
        width, height = rng.uniform(*OPACITY_WIDTH), rng.uniform(*OPACITY_HEIGHT)
        plane = np.exp(-((x - xc) ** 2 + (y - yc) ** 2) / (2 * width**2))
        field += rng.uniform(*OPACITY_PEAK) * plane * np.exp(-((z - zc) ** 2) / (2 * height**2))
    return field


def _volume(label: int, offset: float, depth: int, size: int, rng: np.random.Generator) -> Array:
    chest = _Chest.sample(rng)
    z, y, x = _grid(depth)[:, None, None], _grid(size)[None, :, None], _grid(size)[None, None, :]
    image, lungs = chest.render(z, y, x)
    # Vessels run roughly along z, so one axial pattern broadcast over the depth is a fair stand-in.
    image = image + lungs * _vessels(chest, 0.3, y[0], x[0], rng)[None]
    if label == 1:
        image = image + lungs * _opacities_3d(chest, z, y, x, rng)
    return _finish(image, offset, rng)


def generate_volumes(
    num_samples: int,
    silo_index: int,
    num_silos: int,
    seed: int = 0,
    depth: int = 32,
    image_size: int = 128,
    label_noise: float = LABEL_NOISE,
) -> ArrayDataset:
    """`num_samples` chest volumes [N, 1, depth, S, S] for silo `silo_index` of `num_silos`; label 1 = patient.

    A `label_noise` share of labels is flipped after rendering, so even a perfect reader scores
    `volume_bayes_accuracy(label_noise)` and no model can reach 1.
    """
    rng = np.random.default_rng([seed, silo_index])
    clean = (rng.random(num_samples) < _positive_share(silo_index, num_silos)).astype(np.int64)
    offset = _silo_offset(silo_index, num_silos)
    features = np.empty((num_samples, 1, depth, image_size, image_size), dtype=np.float32)
    for i, label in enumerate(clean.tolist()):
        features[i, 0] = _volume(label, offset, depth, image_size, rng)
    flipped = rng.random(num_samples) < label_noise
    return ArrayDataset(features, np.where(flipped, 1 - clean, clean).astype(np.int64))


def volume_bayes_accuracy(label_noise: float = LABEL_NOISE) -> float:
    """The best accuracy any classifier can reach on `generate_volumes` labels.

    Every patient volume carries two or more opacities inside the lungs, each peaking at least 6 noise sigmas
    above the lung, so the clean label is (all but) a function of the image and only the flipped share is lost.
    """
    return 1.0 - label_noise


def _infection_field(chest: _Chest, z: float, y: Array, x: Array, rng: np.random.Generator) -> Array:
    """Peak-normalised opacity field of one slice: a few overlapping soft blobs, 1 at each blob's centre."""
    field = np.zeros(np.broadcast_shapes(y.shape, x.shape))
    for _ in range(int(rng.integers(1, 4))):
        xc, yc = _lung_point(chest, z, rng, peripheral=True)
        wx, wy = rng.uniform(*LESION_WIDTH, size=2)
        field = np.maximum(field, np.exp(-((x - xc) ** 2) / (2 * wx**2) - (y - yc) ** 2 / (2 * wy**2)))
    return field


def _slice(infected: bool, offset: float, size: int, rng: np.random.Generator) -> tuple[Array, MaskArray]:
    chest = _Chest.sample(rng)
    z = _lower_lobe_z(rng) if infected else float(rng.uniform(-0.8, 0.8))
    y, x = _grid(size)[:, None], _grid(size)[None, :]
    image, lungs = chest.render(np.asarray(z), y, x)
    image = image + lungs * _vessels(chest, z, y, x, rng)
    mask = np.zeros((size, size), dtype=np.uint8)
    if infected:
        field = _infection_field(chest, z, y, x, rng)
        image = image + lungs * rng.uniform(*LESION_PEAK) * field
        mask = ((field >= MASK_LEVEL) & lungs).astype(np.uint8)
    return _finish(image, offset, rng), mask


def generate_slices(
    num_samples: int, silo_index: int, num_silos: int, seed: int = 0, image_size: int = 256
) -> ArrayDataset:
    """`num_samples` axial slices [N, 1, S, S] with infection masks [N, S, S]; labels are -1 (no class label).

    A silo-dependent share of slices (as for the volumes' label balance) shows infection; the rest have empty
    masks.
    """
    rng = np.random.default_rng([seed, silo_index])
    infected = rng.random(num_samples) < _positive_share(silo_index, num_silos)
    offset = _silo_offset(silo_index, num_silos)
    features = np.empty((num_samples, 1, image_size, image_size), dtype=np.float32)
    masks = np.empty((num_samples, image_size, image_size), dtype=np.uint8)
    for i, sick in enumerate(infected.tolist()):
        features[i, 0], masks[i] = _slice(sick, offset, image_size, rng)
    return ArrayDataset(features, np.full(num_samples, -1, dtype=np.int64), masks=masks)
