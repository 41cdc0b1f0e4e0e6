"""Models for a hospital's table: logistic or linear regression and a small MLP over the schema's encoded features."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class TabularModel(nn.Module):
    """[B, num_features] -> [B, num_classes] logits: one linear layer (logistic regression, `hidden_size` absent),
    or `num_layers` hidden layers of `hidden_size` units with ReLU and dropout before it."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        width, self.classes = int(config["num_features"]), int(config["num_classes"])
        layers: list[nn.Module] = []
        if "hidden_size" in config:
            hidden = int(config["hidden_size"])
            for _ in range(int(config["num_layers"])):
                layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(float(config["dropout"]))]
                width = hidden
        layers.append(nn.Linear(width, self.classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(features)
        return logits


class TabularRegressor(TabularModel):
    """[B, num_features] -> [B, 1] predictions of a real-valued label (num_classes 1), trained on their mean squared
    error: linear regression without hidden layers."""

    def batch_loss(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self(features).float()[:, 0], targets.float())
