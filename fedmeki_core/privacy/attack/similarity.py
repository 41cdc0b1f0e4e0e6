"""How close a reconstruction is to the true image: PSNR, and SSIM with a Gaussian window (Wang et al. 2004).

Both take grey images with values in [0, data_range] as arrays of shape (H, W) (leading axes of size 1 are
dropped). SSIM is the mean over the valid region of the local index, computed with an 11 x 11 Gaussian window of
sigma 1.5 and the constants K1 = 0.01, K2 = 0.03 of the paper, as its reference implementation does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03

Array = np.ndarray[Any, np.dtype[np.float64]]


def psnr(image: Any, reference: Any, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; infinity for identical images."""
    a, b = _pair(image, reference)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(image: Any, reference: Any, data_range: float = 1.0) -> float:
    """Mean structural similarity: 1 for identical images, near 0 for unrelated ones, negative when inverted."""
    a, b = _pair(image, reference)
    if min(a.shape) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW} x {WINDOW} pixels, got {a.shape}")
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a**2
    var_b = _blur(b * b) - mu_b**2
    cov = _blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


def _pair(image: Any, reference: Any) -> tuple[Array, Array]:
    a = np.asarray(image, dtype=np.float64).squeeze()
    b = np.asarray(reference, dtype=np.float64).squeeze()
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two grey images of one shape, got {a.shape} and {b.shape}")
    return a, b


def _window() -> Array:
    offsets = np.arange(WINDOW, dtype=np.float64) - WINDOW // 2
    weights: Array = np.exp(-(offsets**2) / (2 * SIGMA**2))
    return weights / float(weights.sum())


def _blur(image: Array) -> Array:
    """The Gaussian-weighted local mean at every position where the window fits (separable: rows, then columns)."""
    weights = _window()
    rows = sliding_window_view(image, WINDOW, axis=1) @ weights
    blurred: Array = sliding_window_view(rows, WINDOW, axis=0) @ weights
    return blurred
