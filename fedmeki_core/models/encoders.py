"""FedMEKI's modality encoders and task heads: what silos train and what crosses the wire.

Each encoder maps a batch of samples to tokens [B, T, token_dim]: the heads mean-pool them into class logits,
and the injection model projects them into the language model's embedding space.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import ViTConfig, ViTModel

from fedmeki_core.tasks import TASKS, Modality, TaskInfo

EHR_FEATURES = 48


class ImageEncoder(nn.Module):
    """A ViT (DeiT-tiny sized by default) from a transformers config, over one grey channel."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.vit = ViTModel(
            ViTConfig(
                image_size=int(config["image_size"]),
                patch_size=int(config["patch_size"]),
                num_channels=1,
                hidden_size=int(config["image_hidden"]),
                num_hidden_layers=int(config["image_layers"]),
                num_attention_heads=int(config["image_heads"]),
                intermediate_size=int(config["image_intermediate"]),
                hidden_dropout_prob=float(config["dropout"]),
                attention_probs_dropout_prob=float(config["dropout"]),
            ),
            add_pooling_layer=False,
        )
        self.projection = nn.Linear(int(config["image_hidden"]), int(config["token_dim"]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Per-image standardisation: scanners and sites differ in brightness and contrast, findings do not.
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        std = images.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-3)
        hidden = self.vit(pixel_values=(images - mean) / std).last_hidden_state
        tokens: torch.Tensor = self.projection(hidden)
        return tokens


class EcgEncoder(nn.Module):
    """Two Conv1d + BatchNorm + ReLU blocks over the 12 leads, then a linear projection of each time step."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        channels = int(config["ecg_channels"])
        self.blocks = nn.Sequential(
            nn.Conv1d(12, channels, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=7, stride=2, padding=3),
            nn.BatchNorm1d(channels),
            nn.ReLU(),
        )
        self.projection = nn.Linear(channels, int(config["token_dim"]))

    def forward(self, signals: torch.Tensor) -> torch.Tensor:
        tokens: torch.Tensor = self.projection(self.blocks(signals).transpose(1, 2))
        return tokens


class EhrEncoder(nn.Module):
    """Linear to the model width, one transformer encoder layer, layer norm, projection (any number of hours)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width = int(config["ehr_width"])
        self.width = width
        self.embed = nn.Linear(EHR_FEATURES, width)
        self.layer = nn.TransformerEncoderLayer(
            width,
            int(config["ehr_heads"]),
            dim_feedforward=4 * width,
            dropout=float(config["dropout"]),
            batch_first=True,
        )
        self.norm = nn.LayerNorm(width)
        self.projection = nn.Linear(width, int(config["token_dim"]))

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(series) + _sinusoid(series.shape[1], self.width, series.device)
        tokens: torch.Tensor = self.projection(self.norm(self.layer(hidden)))
        return tokens


def _sinusoid(length: int, width: int, device: torch.device) -> torch.Tensor:
    """Fixed positional encodings: no parameters, so 24-hour and 168-hour series share the encoder."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    scale = torch.exp(torch.arange(0, width, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * scale)
    table[:, 1::2] = torch.cos(position * scale)[:, : width // 2]
    return table


_ENCODERS: dict[Modality, type[nn.Module]] = {
    Modality.XRAY: ImageEncoder,
    Modality.ECG: EcgEncoder,
    Modality.EHR: EhrEncoder,
}


class MultiTaskEncoders(nn.Module):
    """One encoder per modality the tasks use, and a 2-class head per training task."""

    def __init__(self, train_tasks: tuple[TaskInfo, ...], modalities: tuple[Modality, ...], config: dict[str, Any]):
        super().__init__()
        unsupported = sorted(set(modalities) - _ENCODERS.keys())
        if unsupported:
            raise ValueError(f"no FedMEKI encoder for modality {unsupported[0]}")
        self.encoders = nn.ModuleDict({str(m): _ENCODERS[m](config) for m in sorted(modalities)})
        self.heads = nn.ModuleDict({t.name: nn.Linear(int(config["token_dim"]), t.num_classes) for t in train_tasks})
        self.image_size = int(config["image_size"])

    def encode(self, features: torch.Tensor, modality: Modality) -> torch.Tensor:
        tokens: torch.Tensor = self.encoders[str(modality)](features)
        return tokens

    def forward(self, features: torch.Tensor, task: str) -> torch.Tensor:
        tokens = self.encode(features, TASKS[task].modality)
        logits: torch.Tensor = self.heads[task](tokens.mean(dim=1))
        return logits

    def for_task(self, task: str) -> TaskView:
        return TaskView(self, task)


class TaskView(nn.Module):
    """The multi-task model seen as a one-task classifier, so the shared training loop needs no change."""

    def __init__(self, model: MultiTaskEncoders, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(features, self.task)
        return logits
