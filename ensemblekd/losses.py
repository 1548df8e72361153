"""The distillation loss (Hinton, Vinyals, Dean 2015) as a pure tensor function.

    L = alpha * CE(y, softmax(z_s)) + (1 - alpha) * T^2 * D(p_mix, softmax(z_s / T))

D is the divergence chosen by distill.loss (`Divergence`, whose call is the one place for the
formulas), forward KL(p_mix || s) by default. CE is averaged over the labelled rows of the
batch (label == IGNORE marks a row without one) and is 0 for a batch with none; D is averaged over
all rows ("batchmean"), so unlabelled rows contribute only the soft term.

T^2 multiplies the soft term for every divergence, so alpha and T mean the same whichever is
chosen. Hinton's reason carries over to the smooth ones: near q = s each is (f''(1) / 2) chi^2,
whose gradient in z shrinks like 1 / T^2 as T grows. TVD is not smooth there and shrinks only
like 1 / T, so with TVD a large T weighs the soft term more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import cache
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from pydantic import Field

from ensemblekd.plugins import Options, own_options, resolve

IGNORE = -100


class KDLoss(NamedTuple):
    """The loss of one micro-batch and its parts: `terms` holds the feature and relation terms
    (name -> value before weighting), the same names at every step of a run."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    terms: Mapping[str, torch.Tensor] = MappingProxyType({})


class Divergence(NamedTuple):
    """D(q, s) between the target q and the student s (distill.loss, jsd_beta, skew_alpha; built
    from a config by `divergence`):

    forward_kl        KL(q || s)                                  Hinton et al. 2015
    reverse_kl        KL(s || q)                                  MiniLLM, Gu et al. 2024
    jsd               b KL(q || m) + (1 - b) KL(s || m),  m = b q + (1 - b) s     GKD, Agarwal et al. 2024
    tvd               1/2 sum |q - s|                             Wen et al. 2023
    skew_kl           KL(q || a q + (1 - a) s)                    DistiLLM, Ko et al. 2024
    skew_reverse_kl   KL(s || a s + (1 - a) q)                    DistiLLM

    with b = jsd_beta, a = skew_alpha. A name of the form 'module:callable' is a user's own:
    callable(log_q, log_s, **options) -> D per row, like these, `options` the fields of its own
    `Options` model (plugins) from the keys beside distill.loss (on the token task's top-k path it
    is applied to the buckets of each position, exact for f-divergences, as topk says)."""

    name: str
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    options: tuple[tuple[str, Any], ...] = ()  # a user divergence's keywords

    def __call__(self, log_q: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
        """D(q, s) per row [...] from log-probabilities over the last dim: log_q the target's (−inf for
        an exact 0 is fine), log_s the student's (a log_softmax, finite).

        log q is floored at the smallest normal float (log ≈ −87 in float32): a q of 0 then adds
        nothing measurable to forward KL, and reverse KL, +inf where the student puts mass on a class
        the target excludes, becomes a large finite penalty instead of an inf or NaN step. The
        mixtures of the other four are never 0 where either side is positive, so they stay finite.
        """
        log_q = log_q.clamp_min(math.log(torch.finfo(log_q.dtype).tiny))
        built_in = _BUILT_IN.get(self.name)
        if built_in is not None:
            return built_in(self, log_q, log_s)
        return user_divergence(self.name)(log_q, log_s, **dict(self.options))


class JSDOptions(Options):
    jsd_beta: float = Field(default=0.5, gt=0, lt=1, description="the teacher's share beta of the mixture")


class SkewOptions(Options):
    skew_alpha: float = Field(default=0.1, gt=0, lt=1, description="the share of the first argument mixed into "
                              "the second")


def _jsd(d: Divergence, log_q: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    b = d.jsd_beta
    log_m = _log_mix(log_q, log_s, b)
    return b * _kl(log_q, log_m) + (1.0 - b) * _kl(log_s, log_m)


_BUILT_IN: dict[str, Callable[[Divergence, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "forward_kl": lambda d, log_q, log_s: _kl(log_q, log_s),
    "reverse_kl": lambda d, log_q, log_s: _kl(log_s, log_q),
    "jsd": _jsd,
    "tvd": lambda d, log_q, log_s: 0.5 * (log_q.exp() - log_s.exp()).abs().sum(-1),
    "skew_kl": lambda d, log_q, log_s: _kl(log_q, _log_mix(log_q, log_s, d.skew_alpha)),
    "skew_reverse_kl": lambda d, log_q, log_s: _kl(log_s, _log_mix(log_s, log_q, d.skew_alpha)),
}
DIVERGENCES = tuple(_BUILT_IN)  # the built-in names of distill.loss
# what each takes beside distill.loss: a built-in divergence is a function, so its Options are listed here
BUILT_IN_OPTIONS: dict[str, type[Options]] = {**dict.fromkeys(DIVERGENCES, Options), "jsd": JSDOptions,
                                              "skew_kl": SkewOptions, "skew_reverse_kl": SkewOptions}


def loss_extension(name: str) -> Any:
    """What owns distill.loss's keys: the built-in's Options, or the user's callable (its `Options`)."""
    return BUILT_IN_OPTIONS.get(name) or user_divergence(name)


def divergence(distill_cfg: Any) -> Divergence:
    """The divergence a `distill` config section asks for, with its own keys (jsd_beta, ...)."""
    name = distill_cfg.loss
    options = own_options(loss_extension(name), distill_cfg.extension_keys, "distill")
    if name in BUILT_IN_OPTIONS:
        return Divergence(name, **dict(options))
    return Divergence(name, options=tuple(dict(options).items()))


@cache
def user_divergence(path: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """distill.loss given as 'module:callable', imported once per process."""
    return resolve(path, dict.fromkeys(DIVERGENCES), "distill.loss")  # never called with a built-in: an unknown name raises


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim; a term with a = 0 is 0 (no 0 · (−inf) = NaN, in value or gradient)."""
    a = log_a.exp()
    return (a * torch.where(a > 0, log_a - log_b, 0.0)).sum(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, share_a: float) -> torch.Tensor:
    """log(share_a · a + (1 − share_a) · b), stable (a logaddexp)."""
    return torch.logaddexp(log_a + math.log(share_a), log_b + math.log1p(-share_a))


def kd_loss(student_logits: torch.Tensor, target_probs: torch.Tensor, labels: torch.Tensor,
            temperature: float, alpha: float, divergence: Divergence = Divergence("forward_kl")) -> KDLoss:
    """student_logits [B, C], target_probs [B, C] (already softened at T), labels [B]."""
    z = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))  # float32, or float64 kept
    log_s_t = F.log_softmax(z / temperature, dim=-1)
    kd = divergence(target_probs.to(z.dtype).log(), log_s_t).mean()
    labelled = labels != IGNORE
    if labelled.any():
        ce = F.cross_entropy(z[labelled], labels[labelled])
    else:
        ce = z.sum() * 0.0
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kd
    return KDLoss(loss, ce, kd)

