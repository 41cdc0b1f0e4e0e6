"""Deep leakage from gradients: rebuild a training image from the update one local step on it produced.

The victim is DLG's small network (Zhu et al. 2019): three 5 x 5 convolutions with sigmoid activations and one
linear layer over two classes, on 32 x 32 grey X-rays. Smooth activations make the gradient twice differentiable
everywhere, which the attack needs; it is the setting in which the attack is known to work, i.e. the attacker's
best case.

The attack is Geiping et al. 2020 ("Inverting gradients"): a dummy image, started from noise, is moved by Adam so
that the gradient it produces has the greatest cosine similarity with the observed one, plus a small total-
variation prior; pixels stay in [0, 1]. The label comes first, from the sign of the last layer's bias gradient
(iDLG, Zhao et al. 2020): for one sample under cross-entropy, only the true class has a negative logit gradient.
An update after one SGD step is -learning_rate x gradient, so the cosine target is the negated update; its scale
(the learning rate, any clipping) does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

IMAGE_SIZE = 32
CLASSES = 2
LEARNING_RATE = 0.1  # the attack's Adam step at the start; divided by 10 at 3/8, 5/8 and 7/8 of the steps
TV_WEIGHT = 1e-4  # small: the X-rays carry pixel noise that a strong smoothness prior would erase


class LeakNet(nn.Module):
    """DLG's LeNet variant: 3 sigmoid convolutions (12 channels, 5 x 5) and a linear layer to the classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(12 * (IMAGE_SIZE // 4) ** 2, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.features(images))
        return logits


def build_model(seed: int) -> LeakNet:
    """The global model of the round, weights uniform in [-0.5, 0.5] as in DLG."""
    generator = torch.Generator().manual_seed(seed)
    model = LeakNet()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.5, 0.5, generator=generator)
    return model


def gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, create_graph: bool = False
) -> list[torch.Tensor]:
    """The cross-entropy gradient (mean over the batch) with respect to every parameter, in parameter order."""
    loss = nn.functional.cross_entropy(model(images), labels)
    return list(torch.autograd.grad(loss, list(model.parameters()), create_graph=create_graph))


def sgd_delta(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, learning_rate: float) -> list[torch.Tensor]:
    """What a silo uploads after one local SGD step on `images`: new weights minus the global ones."""
    return [-learning_rate * gradient.detach() for gradient in gradients(model, images, labels)]


def infer_label(update: Sequence[torch.Tensor]) -> int:
    """iDLG: the class whose bias moved up (the only negative logit gradient of a single sample)."""
    return int(torch.argmax(update[-1]))


def invert(model: nn.Module, update: Sequence[torch.Tensor], steps: int, seed: int) -> torch.Tensor:
    """The image, shape [1, 1, S, S] in [0, 1], whose one-step update best matches `update` in direction."""
    label = torch.tensor([infer_label(update)])
    target = [-tensor.detach() for tensor in update]
    target_norm = l2_norm(target)
    dummy = torch.rand(1, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    optimiser = torch.optim.Adam([dummy], lr=LEARNING_RATE)
    milestones = [steps * 3 // 8, steps * 5 // 8, steps * 7 // 8]
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, gamma=0.1)
    for _ in range(steps):
        optimiser.zero_grad()
        produced = gradients(model, dummy, label, create_graph=True)
        dot = torch.stack([(a * b).sum() for a, b in zip(produced, target, strict=True)]).sum()
        loss = 1 - dot / (l2_norm(produced) * target_norm + 1e-12) + TV_WEIGHT * total_variation(dummy)
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            dummy.clamp_(0.0, 1.0)
    return dummy.detach()


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels, across rows and columns."""
    rows = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    columns = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return rows + columns


def l2_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all the tensors together."""
    return torch.sqrt(torch.stack([(tensor**2).sum() for tensor in tensors]).sum())
