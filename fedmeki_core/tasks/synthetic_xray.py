"""Synthetic chest X-rays: one renderer of chest anatomy and findings, and the four FedMEKI X-ray tasks drawn from it.

A scene (anatomy plus findings, one row per image) is rendered to [1, S, S] grey levels in [0, 1] on coordinates
u (image left to right) and v (top to bottom) in [-1, 1]. Radiological convention: the image's left half shows the
patient's right lung, and the heart bulges to the image's right. Findings are drawn first and then rendered, so
they are visible by construction; a `label_noise` share of binary labels is then flipped (reader disagreement),
which makes the Bayes accuracy 1 - label_noise. Silos differ in prevalence and in their scanner's brightness and
contrast.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedmeki_core.tasks.dataset import ArrayDataset, FloatArray

Array = np.ndarray[Any, np.dtype[np.float64]]
BoolArray = np.ndarray[Any, np.dtype[np.bool_]]

LABEL_NOISE = 0.08
NORMAL_CTR = (0.42, 0.03)  # mean and sd of a normal cardiothoracic ratio
ENLARGED_CTR = (0.57, 0.66)  # uniform range of an enlarged one: clearly above the 0.55 cut-off
MAX_OPACITIES = 3
_SCANNER_SEED = 20250114  # a silo's scanner is the same for every seed
_STREAMS = {
    "lung-opacity": 101,
    "covid-19": 102,
    "enlarged-cardiomediastinum": 103,
    "medvqa": 104,
    "xray-local-findings": 105,
}
LOCAL_FINDINGS = ("normal", "focal opacity", "ground glass", "enlarged heart")
_CHUNK = 32  # images rendered at once: bounds the temporaries at image_size 224

# Opacity sides: which lungs hold opacities (patient's side, not the image's).
NONE, RIGHT, LEFT, BOTH = 0, 1, 2, 3
SIDE_ANSWERS = {RIGHT: "right lung", LEFT: "left lung", BOTH: "both lungs"}
OPACITY_QUESTIONS = (
    "Is there an opacity in the lungs?",
    "Are there any lung opacities?",
    "Does this chest X-ray show a lung opacity?",
)
SIDE_QUESTIONS = ("Which lung has the opacity?", "Where is the opacity located?", "Which side is the opacity on?")
HEART_QUESTIONS = ("Is the heart enlarged?", "Is there cardiomegaly?", "Is the cardiac silhouette enlarged?")
HEART_ANSWERS = ("no, the heart size is normal", "yes, the heart is enlarged")


@dataclass(frozen=True)
class Scene:
    """What a batch of images shows, one row per image, in image coordinates."""

    body_width: Array  # [N] scales the thorax horizontally
    lung_scale: Array  # [N]
    shift: Array  # [N, 2] patient positioning (u, v)
    density: Array  # [N] soft-tissue brightness
    ctr: Array  # [N] cardiothoracic ratio: heart width over thorax width
    opacity_center: Array  # [N, K, 2]
    opacity_sigma: Array  # [N, K]
    opacity_amplitude: Array  # [N, K], 0 where there is no opacity
    haze: Array  # [N] ground-glass amplitude, 0 where there is none

    def __len__(self) -> int:
        return int(self.ctr.shape[0])

    def rows(self, start: int, stop: int) -> Scene:
        return Scene(**{name: value[start:stop] for name, value in vars(self).items()})

    def lung_centers(self) -> Array:
        """[N, 2 lungs (patient's right, left), 2 coordinates]."""
        side = np.array([-1.0, 1.0])  # the patient's right lung lies on the image's left
        u = self.shift[:, None, 0] + side[None, :] * 0.40 * self.body_width[:, None]
        v = np.repeat(self.shift[:, None, 1] - 0.05, 2, axis=1)
        return np.stack([u, v], axis=-1)

    def lung_axes(self) -> Array:
        """[N, 2]: the lungs' horizontal and vertical semi-axes."""
        return np.stack([0.27 * self.body_width * self.lung_scale, 0.55 * self.lung_scale], axis=-1)

    def thorax_width(self) -> Array:
        return np.asarray(2.0 * (0.40 * self.body_width + self.lung_axes()[:, 0]), dtype=np.float64)

    def heart_center(self) -> Array:
        """[N, 2]: the heart sits low and bulges to the patient's left (the image's right)."""
        offset = np.stack([0.10 * self.body_width, np.full(len(self), 0.32)], axis=-1)
        return np.asarray(self.shift + offset, dtype=np.float64)

    def heart_axes(self) -> Array:
        return np.stack([self.ctr * self.thorax_width() / 2.0, np.full(len(self), 0.3)], axis=-1)


def positive_share(silo_index: int, num_silos: int) -> float:
    """Label skew: silos range from mostly-negative to mostly-positive populations."""
    return 0.2 + 0.6 * (silo_index + 0.5) / max(num_silos, 1)


def bayes_accuracy(label_noise: float = LABEL_NOISE) -> float:
    """The best accuracy any classifier reaches: findings are visible, only the flipped labels are lost."""
    return 1.0 - label_noise


def draw_anatomy(rng: np.random.Generator, n: int) -> Scene:
    """Normal chests: varied build, positioning and heart size, no findings."""
    return Scene(
        body_width=rng.uniform(0.92, 1.05, n),
        lung_scale=rng.uniform(0.92, 1.05, n),
        shift=rng.normal(scale=0.03, size=(n, 2)),
        density=rng.uniform(0.9, 1.1, n),
        ctr=np.clip(rng.normal(*NORMAL_CTR, size=n), 0.34, 0.5),
        opacity_center=np.zeros((n, MAX_OPACITIES, 2)),
        opacity_sigma=np.ones((n, MAX_OPACITIES)),
        opacity_amplitude=np.zeros((n, MAX_OPACITIES)),
        haze=np.zeros(n),
    )


def with_enlarged_hearts(rng: np.random.Generator, scene: Scene, enlarged: BoolArray) -> Scene:
    ctr = np.where(enlarged, rng.uniform(*ENLARGED_CTR, len(scene)), scene.ctr)
    return replace(scene, ctr=ctr)


def with_opacities(rng: np.random.Generator, scene: Scene, sides: np.ndarray[Any, Any]) -> Scene:
    """Add 1-3 bright gaussian opacities inside the lungs named by `sides` (NONE, RIGHT, LEFT or BOTH).

    Place them after the heart is sized: they avoid the heart's shadow.
    """
    n = len(scene)
    count = np.where(sides == BOTH, rng.integers(2, MAX_OPACITIES + 1, n), rng.integers(1, MAX_OPACITIES + 1, n))
    # Lung of each opacity: 0 = patient's right, 1 = left; BOTH puts the first two on different sides.
    mixed = np.concatenate([np.zeros((n, 1)), np.ones((n, 1)), rng.integers(0, 2, (n, MAX_OPACITIES - 2))], axis=1)
    lung = np.where(sides[:, None] == BOTH, mixed, np.where(sides[:, None] == LEFT, 1, 0)).astype(np.int64)
    centers = _place_in_lungs(rng, scene, np.take_along_axis(scene.lung_centers(), lung[..., None], axis=1))
    present = (sides[:, None] != NONE) & (np.arange(MAX_OPACITIES)[None, :] < count[:, None])
    return replace(
        scene,
        opacity_center=centers,
        opacity_sigma=rng.uniform(0.07, 0.13, (n, MAX_OPACITIES)),
        opacity_amplitude=np.where(present, rng.uniform(0.25, 0.4, (n, MAX_OPACITIES)), 0.0),
    )


def _place_in_lungs(rng: np.random.Generator, scene: Scene, lung_centers: Array, tries: int = 8) -> Array:
    """[N, K, 2] points inside the given lungs' central part, and not behind the heart, where they would hide."""
    shape = (*lung_centers.shape[:2], tries)
    radius, angle = 0.65 * np.sqrt(rng.random(shape)), rng.uniform(0.0, 2.0 * np.pi, shape)
    offset = np.stack([np.cos(angle), np.sin(angle)], axis=-1) * radius[..., None]
    points = lung_centers[:, :, None, :] + offset * scene.lung_axes()[:, None, None, :]
    # Inside the heart's ellipse grown by an opacity's width: rejected; the first try that lands outside is kept.
    grown = scene.heart_axes()[:, None, None, :] + 0.1
    inside = (((points - scene.heart_center()[:, None, None, :]) / grown) ** 2).sum(axis=-1) < 1.0
    first = np.argmin(inside, axis=-1)  # the first try outside, or the first try when all land inside
    return np.asarray(np.take_along_axis(points, first[..., None, None], axis=2)[:, :, 0], dtype=np.float64)


def with_ground_glass(rng: np.random.Generator, scene: Scene, present: BoolArray) -> Scene:
    """Bilateral, peripheral, lower-zone haze: the typical COVID-19 pattern."""
    return replace(scene, haze=np.where(present, rng.uniform(0.2, 0.3, len(scene)), 0.0))


def _sigmoid(x: Array) -> Array:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * x)), dtype=np.float64)  # tanh: no overflow far from the edge


def _ellipse(u: Array, v: Array, center: Array, axes: Array, edge: float = 0.05) -> Array:
    """A soft 0..1 mask of ellipses; center and axes are [n, 2], u and v broadcast to [n, S, S]."""
    du = (u - center[:, 0, None, None]) / axes[:, 0, None, None]
    dv = (v - center[:, 1, None, None]) / axes[:, 1, None, None]
    return _sigmoid((1.0 - np.sqrt(du**2 + dv**2)) / edge)


def _render_chunk(scene: Scene, size: int, rng: np.random.Generator) -> Array:
    grid = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    u, v = grid[None, None, :], grid[None, :, None]
    su, sv = scene.shift[:, 0, None, None], scene.shift[:, 1, None, None]
    body = _ellipse(
        u, v, scene.shift + np.array([0.0, 0.1]), np.stack([0.92 * scene.body_width, np.full(len(scene), 1.1)], -1)
    )
    centers, axes = scene.lung_centers(), scene.lung_axes()
    lungs = np.clip(_ellipse(u, v, centers[:, 0], axes) + _ellipse(u, v, centers[:, 1], axes), 0.0, 1.0)
    heart = _ellipse(u, v, scene.heart_center(), scene.heart_axes(), edge=0.03)
    ribs = (0.5 + 0.5 * np.cos(2.0 * np.pi * 5.0 * (v - sv + 0.35 * (u - su) ** 2))) ** 4
    spine = np.exp(-(((u - su) / 0.07) ** 2)) * body
    image = 0.08 + 0.55 * scene.density[:, None, None] * body + 0.12 * spine + 0.05 * heart
    image = image - 0.38 * lungs * (1.0 - heart) + 0.08 * ribs * lungs
    return np.asarray(image + lungs * (_opacities(scene, u, v) + _haze(scene, u, v, su, sv, rng)), dtype=np.float64)


def _opacities(scene: Scene, u: Array, v: Array) -> Array:
    total = np.zeros((len(scene), v.shape[1], u.shape[2]))
    for k in range(MAX_OPACITIES):
        du = u - scene.opacity_center[:, k, 0, None, None]
        dv = v - scene.opacity_center[:, k, 1, None, None]
        sigma = scene.opacity_sigma[:, k, None, None]
        total += scene.opacity_amplitude[:, k, None, None] * np.exp(-(du**2 + dv**2) / (2.0 * sigma**2))
    return total


def _haze(scene: Scene, u: Array, v: Array, su: Array, sv: Array, rng: np.random.Generator) -> Array:
    peripheral = _sigmoid((np.abs(u - su) - 0.42 * scene.body_width[:, None, None]) / 0.06)
    lower = _sigmoid((v - sv - 0.05) / 0.08)
    # Ground glass is mottled, not flat: one random low-frequency texture per image.
    k, phase = rng.uniform(2.0, 4.0, (len(scene), 2)), rng.uniform(0.0, 2.0 * np.pi, len(scene))
    texture = 1.0 + 0.25 * np.cos(np.pi * (k[:, 0, None, None] * u + k[:, 1, None, None] * v) + phase[:, None, None])
    return np.asarray(scene.haze[:, None, None] * peripheral * lower * texture, dtype=np.float64)


def scanner(silo_index: int) -> tuple[float, float]:
    """The (brightness offset, contrast) of a silo's X-ray machines."""
    brightness, contrast = np.random.default_rng([_SCANNER_SEED, silo_index]).uniform([-0.06, 0.85], [0.06, 1.15])
    return float(brightness), float(contrast)


def render(scene: Scene, image_size: int, rng: np.random.Generator, silo_index: int) -> FloatArray:
    """[N, 1, S, S] grey levels in [0, 1]: the scene through silo `silo_index`'s scanner, with quantum noise."""
    brightness, contrast = scanner(silo_index)
    images = np.empty((len(scene), 1, image_size, image_size), dtype=np.float32)
    for start in range(0, len(scene), _CHUNK):
        chunk = _render_chunk(scene.rows(start, start + _CHUNK), image_size, rng)
        chunk = contrast * (chunk - 0.5) + 0.5 + brightness + rng.normal(scale=0.03, size=chunk.shape)
        images[start : start + _CHUNK, 0] = np.clip(chunk, 0.0, 1.0)
    return images


def _flip(rng: np.random.Generator, finding: BoolArray, label_noise: float) -> np.ndarray[Any, np.dtype[np.int64]]:
    return np.asarray(finding ^ (rng.random(finding.shape[0]) < label_noise), dtype=np.int64)


def _start(
    task: str, num_samples: int, silo_index: int, num_silos: int, seed: int
) -> tuple[np.random.Generator, BoolArray, Scene]:
    """A binary task's random stream, which samples carry its finding, and their normal anatomy."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS[task]])
    finding = rng.random(num_samples) < positive_share(silo_index, num_silos)
    return rng, finding, draw_anatomy(rng, num_samples)


def generate_lung_opacity(
    num_samples: int,
    silo_index: int,
    num_silos: int,
    seed: int = 0,
    image_size: int = 224,
    label_noise: float = LABEL_NOISE,
) -> ArrayDataset:
    """Label 1: one to three focal opacities in one or both lungs (RSNA Pneumonia style)."""
    rng, finding, scene = _start("lung-opacity", num_samples, silo_index, num_silos, seed)
    sides = np.where(finding, rng.integers(RIGHT, BOTH + 1, num_samples), NONE)
    images = render(with_opacities(rng, scene, sides), image_size, rng, silo_index)
    return ArrayDataset(images, _flip(rng, finding, label_noise))


def generate_covid_19(
    num_samples: int,
    silo_index: int,
    num_silos: int,
    seed: int = 0,
    image_size: int = 224,
    label_noise: float = LABEL_NOISE,
) -> ArrayDataset:
    """Label 1: bilateral peripheral lower-zone ground glass. Some negatives carry a focal (non-COVID) opacity."""
    rng, finding, scene = _start("covid-19", num_samples, silo_index, num_silos, seed)
    # Focal pneumonia among the negatives: the model must learn the pattern, not "anything bright in the lungs".
    focal = ~finding & (rng.random(num_samples) < 0.25)
    sides = np.where(focal, rng.integers(RIGHT, LEFT + 1, num_samples), NONE)
    scene = with_ground_glass(rng, with_opacities(rng, scene, sides), finding)
    return ArrayDataset(render(scene, image_size, rng, silo_index), _flip(rng, finding, label_noise))


def generate_enlarged_cardiomediastinum(
    num_samples: int,
    silo_index: int,
    num_silos: int,
    seed: int = 0,
    image_size: int = 224,
    label_noise: float = LABEL_NOISE,
) -> ArrayDataset:
    """Label 1: a cardiothoracic ratio above 0.55 (normal hearts are about 0.42)."""
    rng, finding, scene = _start("enlarged-cardiomediastinum", num_samples, silo_index, num_silos, seed)
    images = render(with_enlarged_hearts(rng, scene, finding), image_size, rng, silo_index)
    return ArrayDataset(images, _flip(rng, finding, label_noise))


def local_classes(silo_index: int) -> int:
    """How many of LOCAL_FINDINGS silo `silo_index` labels: 2, 3, then 4 (hospitals name different findings)."""
    return min(2 + silo_index, len(LOCAL_FINDINGS))


def generate_xray_local_findings(
    num_samples: int,
    silo_index: int,
    num_silos: int,
    seed: int = 0,
    image_size: int = 224,
    label_noise: float = LABEL_NOISE,
) -> ArrayDataset:
    """Label c < local_classes(silo): the c-th of LOCAL_FINDINGS, drawn uniformly; noisy labels move to another."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["xray-local-findings"]])
    classes = local_classes(silo_index)
    finding = rng.integers(0, classes, num_samples)
    scene = draw_anatomy(rng, num_samples)
    scene = with_opacities(rng, scene, np.where(finding == 1, rng.integers(RIGHT, BOTH + 1, num_samples), NONE))
    scene = with_enlarged_hearts(rng, with_ground_glass(rng, scene, finding == 2), finding == 3)
    flipped = rng.random(num_samples) < label_noise
    labels = np.where(flipped, (finding + rng.integers(1, classes, num_samples)) % classes, finding)
    return ArrayDataset(render(scene, image_size, rng, silo_index), np.asarray(labels, dtype=np.int64))


def _medvqa_pair(rng: np.random.Generator, side: int, enlarged: bool) -> tuple[str, str]:
    """One question about the image and the answer its rendered findings give."""
    kinds = ("opacity", "side", "heart") if side != NONE else ("opacity", "heart")
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "opacity":
        return str(rng.choice(OPACITY_QUESTIONS)), "yes" if side != NONE else "no"
    if kind == "side":
        return str(rng.choice(SIDE_QUESTIONS)), SIDE_ANSWERS[side]
    return str(rng.choice(HEART_QUESTIONS)), HEART_ANSWERS[int(enlarged)]


def generate_medvqa(
    num_samples: int, silo_index: int, num_silos: int, seed: int = 0, image_size: int = 224
) -> ArrayDataset:
    """Questions on opacity presence, its side and heart size; answers follow the rendered findings exactly."""
    rng = np.random.default_rng([seed, silo_index, _STREAMS["medvqa"]])
    share = positive_share(silo_index, num_silos)
    sides = np.where(rng.random(num_samples) < share, rng.integers(RIGHT, BOTH + 1, num_samples), NONE)
    enlarged = rng.random(num_samples) < 1.0 - share  # skewed the other way from the opacities
    scene = with_opacities(rng, with_enlarged_hearts(rng, draw_anatomy(rng, num_samples), enlarged), sides)
    pairs = [_medvqa_pair(rng, int(side), bool(big)) for side, big in zip(sides, enlarged, strict=True)]
    return ArrayDataset(
        render(scene, image_size, rng, silo_index),
        np.full(num_samples, -1, dtype=np.int64),
        questions=tuple(question for question, _ in pairs),
        answers=tuple(answer for _, answer in pairs),
    )
