"""The distillation loss (Hinton, Vinyals, Dean 2015) as a pure tensor function.

    L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * KL(p_mix || softmax(z_s / T))

CE is averaged over the labelled rows of the batch (label == IGNORE marks a row without one) and
is 0 for a batch with none; KL is averaged over all rows ("batchmean"), so unlabelled rows
contribute only the soft term.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE = -100


class KDLoss(NamedTuple):
    """The loss of one micro-batch and its parts: `terms` holds the feature and relation terms
    (name -> value before weighting), the same names at every step of a run."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    terms: Mapping[str, torch.Tensor] = MappingProxyType({})


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float) -> KDLoss:
    """student_logits [B, C], target_probs [B, C] (already softened at T), labels [B]."""
    z = student_logits.float()
    log_s_t = F.log_softmax(z / temperature, dim=-1)
    kd = F.kl_div(log_s_t, target_probs.float(), reduction="batchmean")
    labelled = labels != IGNORE
    if labelled.any():
        ce = F.cross_entropy(z[labelled], labels[labelled])
    else:
        ce = z.sum() * 0.0
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    return KDLoss(loss, ce, kd)
