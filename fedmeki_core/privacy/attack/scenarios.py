"""The attack against each thing the coordinator holds after a round in which silos took one step on one X-ray.

plaintext  silo 0's delta, as a plain FedAvg job uploads it
aggregate  the mean of the `silos` silos' deltas (what a committed round stores), compared with every silo's input
ckks       silo 0's delta encrypted under the federation's key: the coordinator holds the ciphertext file and the
           public context, cannot decrypt (TenSEAL refuses), and attacks the ciphertext bytes instead
dp Nx      silo 0's delta under local DP as a silo applies it: clipped to a norm C, then Gaussian noise of std z x C
           on every coordinate, with z set so the noise std is N times the update's RMS entry (one row per N)
prior      no update at all: the mean of 256 X-rays of a hospital outside the round, the attacker's best guess from
           public knowledge alone (a yardstick: chest X-rays look alike, so this already scores about 20 dB)
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeki_core.privacy.attack.dlg import IMAGE_SIZE, build_model, invert, l2_norm, sgd_delta
from fedmeki_core.privacy.attack.similarity import psnr, ssim
from fedmeki_core.privacy.dp import gaussian_epsilon
from fedmeki_core.privacy.he import encrypt_file, generate_context, load_public_context, public_bytes
from fedmeki_core.privacy.he.ciphertexts import load_ciphertext
from fedmeki_core.privacy.he.encoding import CiphertextReader
from fedmeki_core.tasks.synthetic import generate
from fedmeki_core.wire import TensorSpec

TASK = "lung-opacity"
SILO_LEARNING_RATE = 0.1  # the silos' local SGD step (the attack does not depend on it)
DP_DELTA = 1e-5
PRIOR_SAMPLES = 256

GreyImage = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class AttackSettings:
    steps: int = 2000  # the attack's optimiser steps per reconstruction
    silos: int = 3  # silos in the round (each took one step on one X-ray)
    dp_noise: tuple[float, ...] = (0.1, 1.0)  # local DP noise std as multiples of the update's RMS entry


@dataclass(frozen=True)
class AttackResult:
    """One reconstruction, scored against the input of silo `silo` (for the aggregate: the closest silo's)."""

    scenario: str
    seed: int
    psnr: float
    ssim: float
    silo: int
    original: GreyImage
    reconstruction: GreyImage
    note: str


def run_attacks(seeds: Sequence[int], settings: AttackSettings) -> Iterator[AttackResult]:
    """Every scenario for every seed (the seed draws the model, the silos' X-rays, the noise and the attack's start)."""
    with tempfile.TemporaryDirectory(prefix="fedmeki-dlg-") as work:
        for seed in seeds:
            yield from _round(seed, settings, Path(work))


def _round(seed: int, settings: AttackSettings, work: Path) -> Iterator[AttackResult]:
    model = build_model(seed)
    inputs, deltas = [], []
    for silo in range(settings.silos):
        data = generate(TASK, 1, silo, settings.silos, seed=seed, image_size=IMAGE_SIZE)
        images, labels = torch.from_numpy(data.features), torch.from_numpy(data.labels)
        inputs.append(data.features[0, 0])
        deltas.append(sgd_delta(model, images, labels, SILO_LEARNING_RATE))

    def scored(scenario: str, reconstruction: GreyImage, note: str, candidates: Sequence[int] = (0,)) -> AttackResult:
        silo = max(candidates, key=lambda index: psnr(reconstruction, inputs[index]))
        quality = psnr(reconstruction, inputs[silo]), ssim(reconstruction, inputs[silo])
        return AttackResult(scenario, seed, *quality, silo, inputs[silo], reconstruction, note)

    def attack(update: Sequence[torch.Tensor]) -> GreyImage:
        image: GreyImage = invert(model, update, settings.steps, seed)[0, 0].numpy()
        return image

    yield scored("plaintext", attack(deltas[0]), "silo 0's delta")
    mean = [torch.stack(tensors).mean(0) for tensors in zip(*deltas, strict=True)]
    norms = ", ".join(f"{float(l2_norm(delta)):.2g}" for delta in deltas)
    note = f"mean of {settings.silos} silos' deltas (their norms {norms}); scored against the closest silo's input"
    yield scored("aggregate", attack(mean), note, range(settings.silos))
    names = [name for name, _ in model.named_parameters()]
    ciphertext, note = _coordinator_view_under_ckks(names, deltas[0], work / f"seed-{seed}.ckks")
    yield scored("ckks", attack(ciphertext), note)
    for noise in settings.dp_noise:
        noisy, z = _local_dp(deltas[0], noise, torch.Generator().manual_seed(seed))
        epsilon = gaussian_epsilon(z, 1, DP_DELTA)
        note = (
            f"local DP, noise std {noise:g} x the RMS entry: z = {z:.3g}, epsilon {epsilon:.3g} at delta {DP_DELTA:g}"
        )
        yield scored(f"dp {noise:g}x", attack(noisy), note)
    others = generate(TASK, PRIOR_SAMPLES, settings.silos, settings.silos + 1, seed=seed, image_size=IMAGE_SIZE)
    yield scored("prior", others.features[:, 0].mean(0), f"no update: mean of {PRIOR_SAMPLES} other X-rays")


def _coordinator_view_under_ckks(
    names: Sequence[str], delta: Sequence[torch.Tensor], path: Path
) -> tuple[list[torch.Tensor], str]:
    """Encrypt `delta` as a silo does; then, holding only the public context, decrypt it if that works, else read
    the ciphertext bytes (uint8, mapped to [-1, 1]) as if they were the update. Returns that update and a note."""
    secret = generate_context()
    manifest = [TensorSpec(name, "F32", tuple(tensor.shape)) for name, tensor in zip(names, delta, strict=True)]
    encrypt_file(path, secret, manifest, (tensor.numpy() for tensor in delta))
    public = load_public_context(public_bytes(secret))
    with CiphertextReader(path) as reader:
        blobs = list(reader.blobs())
    try:
        values = np.concatenate([load_ciphertext(public, *blob).decrypt() for blob in blobs]).astype(np.float32)
        note = "decrypted with the public context"
    except ValueError as exc:
        raw = np.frombuffer(b"".join(blob for _, _, blob in blobs), dtype=np.uint8)
        values = raw.astype(np.float32) / 127.5 - 1.0
        note = f"no plaintext available: decrypting with the public context fails ({exc}); attacked the bytes"
    update, start = {}, 0
    for tensor in dict.fromkeys(tensor for tensor, _, _ in blobs):
        update[tensor.name] = torch.from_numpy(values[start : start + tensor.size].copy()).reshape(tensor.shape)
        start += tensor.size
    return [update[name] for name in names], note


def _local_dp(
    delta: Sequence[torch.Tensor], noise: float, generator: torch.Generator
) -> tuple[list[torch.Tensor], float]:
    """Local DP as a silo applies it (clip the whole delta to norm C, add N(0, (z C)^2) to every coordinate), with C
    the delta's own norm (clipping one update only rescales it, which the cosine attack ignores) and z chosen so
    that z C is `noise` x the RMS entry. Returns the noised delta and z."""
    flat = torch.cat([tensor.reshape(-1) for tensor in delta]).double()
    clip_norm = float(flat.norm())
    std = noise * float(flat.pow(2).mean().sqrt())
    return [tensor + torch.randn(tensor.shape, generator=generator) * std for tensor in delta], std / clip_norm
