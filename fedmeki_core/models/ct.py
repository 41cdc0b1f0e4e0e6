"""The PPPML-HMI models: a small 3D CNN classifying CT volumes, a 2D U-Net segmenting infection on CT slices.

Both normalise with GroupNorm, not BatchNorm: BatchNorm's running mean and variance are buffers that each silo
estimates on its own non-IID data, and averaging them across silos (or leaving them local) gives statistics that
fit no silo, a known failure of FedAvg. GroupNorm has no running state, only affine parameters that average well.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

MAX_GROUPS = 4
LEAK = 0.1


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(channels, MAX_GROUPS), channels)


def _activation() -> nn.Module:
    # Leaky: with plain ReLU the U-Net often settled where the head's inputs were all zero on lesions, so its
    # logits could only fall below the bias and never mark a lesion (2 of 3 seeds stuck after 10 epochs, measured).
    return nn.LeakyReLU(LEAK)


class CtVolumeClassifier(nn.Module):
    """[B, 1, D, S, S] -> `depth` blocks of Conv3d, GroupNorm, LeakyReLU (channels doubling, max-pooled between blocks)
    -> global max pool -> 2 logits. Config: `channels` (first block's width, default 8), `depth` (default 3).

    Global max, not average, pooling: a patient is one with *any* opacity (a multiple-instance decision), and a
    focal opacity averaged over the volume barely moves the pooled features, all the less as GroupNorm centres
    each sample's features; with average pooling training sat at chance for tens of epochs on the synthetic set.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width, depth = int(config.get("channels", 8)), int(config.get("depth", 3))
        layers: list[nn.Module] = []
        in_channels = 1
        for level in range(depth):
            out_channels = width * 2**level
            if level:
                layers.append(nn.MaxPool3d(2, ceil_mode=True))  # ceil: thin volumes keep at least one slice
            layers += [nn.Conv3d(in_channels, out_channels, 3, padding=1), _norm(out_channels), _activation()]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(in_channels, 2)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        pooled = self.features(volumes).amax(dim=(2, 3, 4))
        logits: torch.Tensor = self.head(pooled)
        return logits


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        _norm(out_channels),
        _activation(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        _norm(out_channels),
        _activation(),
    )


class UNet2d(nn.Module):
    """[B, 1, S, S] -> per-pixel logits [B, 1, S, S]: a U-Net with `levels` resolutions (default 3), `channels`
    (default 8) doubling at each, max-pool down, bilinear upsampling + conv up, skip connections by concatenation.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width, levels = int(config.get("channels", 8)), int(config.get("levels", 3))
        widths = [width * 2**level for level in range(levels)]
        self.down = nn.ModuleList(
            _double_conv(in_channels, out_channels)
            for in_channels, out_channels in zip([1, *widths[:-1]], widths, strict=True)
        )
        # Upsampling by interpolation, not transposed convolution: no checkerboard artefacts, fewer parameters.
        self.up = nn.ModuleList(
            _double_conv(widths[level + 1] + widths[level], widths[level]) for level in reversed(range(levels - 1))
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def batch_loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The training loop's loss: the model's own, against masks rather than class labels."""
        return segmentation_loss(self(images), masks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        hidden = images
        for index, block in enumerate(self.down):
            if index:
                hidden = nn.functional.max_pool2d(hidden, 2, ceil_mode=True)
            hidden = block(hidden)
            skips.append(hidden)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            # Resize to the skip's exact size, so odd image sizes line up too.
            hidden = nn.functional.interpolate(hidden, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            hidden = block(torch.cat([hidden, skip], dim=1))
        logits: torch.Tensor = self.head(hidden)
        return logits


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Mean BCE-with-logits plus the soft Dice loss (1 - soft Dice pooled over the batch); masks [B, S, S] or
    [B, 1, S, S].

    BCE gives every pixel a gradient; the Dice term keeps small lesions from drowning in the background. Dice is
    pooled over the batch, not per sample: a slice without infection has a per-sample soft Dice of
    smooth / (sum p + smooth), which only pushes every probability down, and with half the slices empty the
    U-Net stayed at predicting nothing for 1 of 4 seeds (measured).
    """
    target = masks.reshape(logits.shape).to(logits.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    dice = (2 * (probs * target).sum() + smooth) / (probs.sum() + target.sum() + smooth)
    return bce + (1 - dice)
