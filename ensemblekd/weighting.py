"""How the teachers' targets are mixed: pure tensor functions behind two small registries.

A *weighting rule* maps the teachers' raw logits of a batch to per-sample weights `w[b, k]`
(rows sum to 1). A *strategy* decides which teachers are used when and turns weights into one
target distribution. A new rule is one class plus one entry in `WEIGHTINGS`; the config schema
checks names against these registries.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch


class WeightingRule(Protocol):
    def __call__(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """teacher_logits [B, K, C] (raw), labels [B] (-100 = none) -> weights [B, K]."""


class Uniform:
    """w_k = 1 / K."""

    def __init__(self, teacher_names: Sequence[str], **_):
        self.k = len(teacher_names)

    def __call__(self, teacher_logits, labels=None):
        b = teacher_logits.shape[0]
        return teacher_logits.new_full((b, self.k), 1.0 / self.k, dtype=torch.float32)


class Static:
    """Given w_k per teacher name, normalised to sum to 1."""

    def __init__(self, teacher_names: Sequence[str], weights: dict[str, float], **_):
        w = torch.tensor([float(weights[n]) for n in teacher_names], dtype=torch.float32)
        self.w = w / w.sum()

    def __call__(self, teacher_logits, labels=None):
        return self.w.to(teacher_logits.device).expand(teacher_logits.shape[0], -1)


WEIGHTINGS: dict[str, type] = {"uniform": Uniform, "static": Static}


def mix(teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float, space: str = "prob") -> torch.Tensor:
    """The mixed soft target p_mix [B, C] from raw logits [B, K, C] and weights [B, K].

    prob:  p_mix = sum_k w_k softmax(z_k / T)      (default)
    logit: p_mix = softmax(sum_k w_k z_k / T)
    """
    z = teacher_logits.float()
    w = weights.unsqueeze(-1)
    if space == "prob":
        return (w * torch.softmax(z / temperature, dim=-1)).sum(dim=1)
    if space == "logit":
        return torch.softmax((w * z).sum(dim=1) / temperature, dim=-1)
    raise ValueError(f"unknown mix space '{space}'")


class Parallel:
    """Every teacher at every step, mixed with a weighting rule."""

    def __init__(self, teacher_names: Sequence[str], weighting: str = "uniform", weights=None, mix_space: str = "prob"):
        self.rule = WEIGHTINGS[weighting](teacher_names, weights=weights)
        self.mix_space = mix_space

    def targets(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float):
        """(p_mix [B, C] at temperature T, weights [B, K])."""
        w = self.rule(teacher_logits, labels)
        return mix(teacher_logits, w, temperature, self.mix_space), w


STRATEGIES: dict[str, type] = {"parallel": Parallel}


def build_strategy(distill_cfg, teacher_names: Sequence[str]):
    cls = STRATEGIES[distill_cfg.strategy]
    return cls(teacher_names, weighting=distill_cfg.weighting, weights=distill_cfg.weights)
