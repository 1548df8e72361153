"""Weighting rules: per sample, how much each teacher's target counts.

A rule is built for a list of teacher names, `Rule(teacher_names, val_accuracy=..., **options)`
(`options`: the fields of the rule's own `Options` model, read from the keys beside
`distill.weighting`; extra keywords are ignored), and called on a batch: (teacher_logits [B, K, C] raw, labels [B] with IGNORE for none, temperature)
-> weights [B, K], rows summing to 1. Pure tensor functions; docs/formulas.md has the formulas
and their papers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F

from pydantic import Field

from ensemblekd.config import Config, Float
from ensemblekd.errors import UserError
from ensemblekd.losses import IGNORE
from ensemblekd.plugins import Options, own_options


def require_accuracy(val_accuracy: dict[str, float | None] | None, names: Sequence[str], what: str) -> dict[str, float]:
    """The teachers' validation accuracies, or a UserError when the val split had no labels."""
    if val_accuracy is None or any(val_accuracy.get(n) is None for n in names):
        raise UserError(f"distill: {what} needs each teacher's validation accuracy, and the val split has no labels; "
                        "give data.val a label column or choose another rule")
    return {n: float(cast(float, val_accuracy[n])) for n in names}


class WeightingRule(Protocol):
    def __call__(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """teacher_logits [B, K, C] (raw), labels [B] (IGNORE = none) -> weights [B, K], rows summing to 1."""


class Uniform:
    """w_k = 1 / K."""

    def __init__(self, teacher_names: Sequence[str], **_):
        self.k = len(teacher_names)

    def __call__(self, teacher_logits, labels=None, temperature=1.0):
        return teacher_logits.new_full((teacher_logits.shape[0], self.k), 1.0 / self.k, dtype=torch.float32)


class _Fixed:
    """The same weights w_k (per teacher name, normalised to sum to 1) for every sample."""

    def __init__(self, teacher_names: Sequence[str], weights: dict[str, float], **_):
        w = torch.tensor([float(weights[n]) for n in teacher_names], dtype=torch.float32)
        self.w = w / w.sum()

    def __call__(self, teacher_logits, labels=None, temperature=1.0):
        return self.w.to(teacher_logits.device).expand(teacher_logits.shape[0], -1)


class Static(_Fixed):
    """Given w_k per teacher name (distill.weights), normalised to sum to 1."""

    class Options(Options):
        weights: dict[str, Float] = Field(description="{teacher_name: weight, ...}, one per teacher")

    @classmethod
    def check_config(cls, cfg: Config, touch: bool = True) -> None:
        weights, names = own_options(cls, cfg.distill.extension_keys, "distill").weights, [t.name for t in cfg.teachers]
        if set(weights) != set(names):
            raise UserError(f"distill.weights: weighting 'static' needs one weight per teacher {sorted(names)}, "
                            f"got {sorted(weights)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise UserError("distill.weights: weights must be >= 0 with a positive sum")


class Accuracy(_Fixed):
    """w_k ∝ acc_k^gamma from each teacher's validation accuracy (stored in the manifest).

    gamma = 1 weighs in proportion to accuracy; a larger gamma sharpens toward the best teacher
    (gamma -> inf picks it alone), gamma = 0 is uniform.
    """

    class Options(Options):
        gamma: Float = Field(default=1.0, ge=0, description="sharpening: w_k ∝ acc_k^gamma")

    def __init__(self, teacher_names: Sequence[str], val_accuracy: dict[str, float | None] | None = None,
                 gamma: float = 1.0, **_):
        acc = require_accuracy(val_accuracy, teacher_names, "weighting 'accuracy'")
        super().__init__(teacher_names, {n: acc[n] ** gamma for n in teacher_names})


def entropy_weights(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """EBKD, as in the CA-MKD reference code: w_k = 1 - H(p_k) / sum_j H(p_j), per sample.

    Those weights sum to K - 1; they are divided by K - 1 here so that rows sum to 1 (the
    relative weights are the paper's). p_k = softmax(z_k / T). One teacher gets weight 1;
    a row where every teacher is certain (all H = 0) gets uniform weights.
    """
    b, k, _ = teacher_logits.shape
    if k == 1:
        return teacher_logits.new_ones((b, 1), dtype=torch.float32)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    h = -(log_p.exp() * log_p).sum(-1)                       # [B, K]
    total = h.sum(-1, keepdim=True)
    share = torch.where(total > 0, h / torch.where(total > 0, total, 1.0), torch.full_like(h, 1.0 / k))
    return (1.0 - share) / (k - 1)


class Entropy:
    """Per sample, a confident (low-entropy) teacher weighs more: entropy_weights."""

    def __init__(self, teacher_names: Sequence[str], **_):
        pass

    def __call__(self, teacher_logits, labels=None, temperature=1.0):
        return entropy_weights(teacher_logits, temperature)


class CAMKD:
    """CA-MKD (Zhang, Chen, Wang 2022): per sample, CE_k = CE(y, softmax(z_k)) and
    w_k = (1 - softmax_k(CE)) / (K - 1), the softmax taken over the teachers: the teacher with
    the lower cross-entropy against the true label weighs more.

    Rows without a label (IGNORE) fall back to the entropy rule, the label-free measure of the
    same confidence. The paper weights per-teacher KL terms; mixing the targets first with the
    same weights gives the same gradient (the two losses differ by a student-independent term).
    """

    def __init__(self, teacher_names: Sequence[str], **_):
        pass

    def __call__(self, teacher_logits, labels=None, temperature=1.0):
        b, k, _ = teacher_logits.shape
        if k == 1:
            return teacher_logits.new_ones((b, 1), dtype=torch.float32)
        fallback = entropy_weights(teacher_logits, temperature)
        if labels is None:
            return fallback
        labelled = labels != IGNORE
        safe = torch.where(labelled, labels, torch.zeros_like(labels))
        log_p = F.log_softmax(teacher_logits.float(), dim=-1)                   # CE at T = 1
        ce = -log_p.gather(-1, safe.view(b, 1, 1).expand(b, k, 1)).squeeze(-1)  # [B, K]
        w = (1.0 - torch.softmax(ce, dim=-1)) / (k - 1)
        return torch.where(labelled.unsqueeze(-1), w, fallback)
