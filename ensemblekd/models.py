"""Small built-in models, referenced from configs as 'ensemblekd.models:NAME'.

Any 'module:callable' returning a torch.nn.Module that maps a float batch [B, F] to logits [B, C]
works as a teacher or student; these are the ones the demo and tests use.
"""

from __future__ import annotations

import math

from torch import nn


def mlp(in_features: int, num_classes: int, hidden: list[int] | tuple[int, ...] = (128,), dropout: float = 0.0) -> nn.Module:
    """A ReLU MLP: in_features -> hidden... -> num_classes."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _ToImage(nn.Module):
    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, x):
        return x.view(x.shape[0], 1, self.side, self.side)


def cnn(in_features: int, num_classes: int, channels: list[int] | tuple[int, ...] = (16, 32), hidden: int = 64) -> nn.Module:
    """A small CNN over a square one-channel image given as a flat feature row (digits: 8x8)."""
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ValueError(f"cnn needs a square image; in_features={in_features} is not a square")
    layers: list[nn.Module] = [_ToImage(side)]
    c_in = 1
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        c_in = c
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c_in * (side // 2) ** 2, hidden), nn.ReLU(),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
