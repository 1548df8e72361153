"""The one loop that fits a torch model from scratch: every teacher `fit` block, for every task."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def fit_module(model: nn.Module, num_examples: int, batch_loss: Callable[[torch.Tensor], torch.Tensor], epochs: int,
               lr: float, batch_size: int, seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """AdamW over a seeded shuffle of the examples each epoch, the learning rate decayed on a cosine
    once per epoch; batch_loss(example indices) gives a minibatch's loss. Returns the model in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(num_examples, generator=g)
        for i in range(0, num_examples, batch_size):
            loss = batch_loss(perm[i:i + batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()
