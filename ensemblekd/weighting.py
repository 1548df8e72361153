"""How the teachers' targets are mixed: pure tensor functions behind two small registries.

A *weighting rule* maps the teachers' raw logits of a batch to per-sample weights `w[b, k]`
(rows sum to 1). A *strategy* decides which teachers are used when and turns weights into one
target distribution. A new rule is one class plus one entry in `WEIGHTINGS`; a new strategy one
class plus one entry in `STRATEGIES`; the config schema checks names against these registries.
Formulas: REFERENCES.md (shared) and the README.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from ensemblekd.losses import IGNORE


class WeightingRule(Protocol):
    def __call__(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """teacher_logits [B, K, C] (raw), labels [B] (IGNORE = none) -> weights [B, K], rows summing to 1."""


class Uniform:
    """w_k = 1 / K."""

    def __init__(self, teacher_names: Sequence[str], **_):
        self.k = len(teacher_names)

    def __call__(self, teacher_logits, labels=None, temperature=1.0):
        return teacher_logits.new_full((teacher_logits.shape[0], self.k), 1.0 / self.k, dtype=torch.float32)


class Static:
    """Given w_k per teacher name, normalised to sum to 1."""

    def __init__(self, teacher_names: Sequence[str], weights: dict[str, float], **_):
        w = torch.tensor([float(weights[n]) for n in teacher_names], dtype=torch.float32)
        self.w = w / w.sum()

    def __call__(self, teacher_logits, labels=None, temperature=1.0):
        return self.w.to(teacher_logits.device).expand(teacher_logits.shape[0], -1)


class Accuracy(Static):
    """w_k ∝ acc_k^gamma from each teacher's validation accuracy (stored in the manifest).

    gamma = 1 weighs in proportion to accuracy; a larger gamma sharpens toward the best teacher
    (gamma -> inf picks it alone), gamma = 0 is uniform.
    """

    def __init__(self, teacher_names: Sequence[str], val_accuracy: dict[str, float], gamma: float = 1.0, **_):
        super().__init__(teacher_names, {n: float(val_accuracy[n]) ** gamma for n in teacher_names})


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


WEIGHTINGS: dict[str, type] = {"uniform": Uniform, "static": Static, "accuracy": Accuracy,
                               "entropy": Entropy, "ca_mkd": CAMKD}


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


class Strategy:
    """A strategy decides the per-sample teacher weights (`weights`, [B, K]); `targets` mixes the
    teachers with them. Token-level runs use `weights` alone: their loss sums per-teacher top-k
    terms with these weights (tokens.sparse_kl), which has the gradient of the mixed target's."""

    mix_space = "prob"

    def weights(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, epoch: int = 0):
        raise NotImplementedError

    def targets(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, epoch: int = 0):
        """(p_mix [B, C] at temperature T, weights [B, K])."""
        w = self.weights(teacher_logits, labels, temperature, epoch)
        return mix(teacher_logits, w, temperature, self.mix_space), w


class Parallel(Strategy):
    """Every teacher at every step, mixed with a weighting rule."""

    def __init__(self, teacher_names: Sequence[str], weighting: str = "uniform", mix_space: str = "prob", **rule_args):
        self.rule = WEIGHTINGS[weighting](teacher_names, **rule_args)
        self.mix_space = mix_space

    def weights(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, epoch: int = 0):
        """[B, K], rows summing to 1."""
        return self.rule(teacher_logits, labels, temperature)


def _scatter(w_active: torch.Tensor, active: list[int], k: int) -> torch.Tensor:
    w = w_active.new_zeros((w_active.shape[0], k))
    w[:, active] = w_active
    return w


def stage_epochs(num_stages: int, epochs: int, given: list[int] | None = None) -> list[int]:
    """Epochs per stage: as given, or `epochs` split evenly (the last stages take the remainder)."""
    if given:
        return list(given)
    base, extra = divmod(epochs, num_stages)
    return [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]


def teacher_order(teacher_names: Sequence[str], order: str, val_accuracy: dict[str, float] | None) -> list[int]:
    """Indices of the teachers in stage order: config order, or by validation accuracy."""
    idx = list(range(len(teacher_names)))
    if order == "config":
        return idx
    acc = [val_accuracy[teacher_names[i]] for i in idx]
    return sorted(idx, key=lambda i: acc[i], reverse=(order == "descending_accuracy"))


class Sequential(Strategy):
    """One teacher per stage (or, cumulative, the teachers so far), each for a stage of epochs.

    The student, its optimizer state and the DeepSpeed engine simply carry on from stage to stage:
    only the targets change. Within a stage the weighting rule runs over the active teachers.
    """

    def __init__(self, teacher_names: Sequence[str], weighting: str = "uniform", mix_space: str = "prob",
                 order: str = "config", cumulative: bool = False, epochs: int = 1, stage_epochs_given=None,
                 val_accuracy=None, **rule_args):
        self.k, self.mix_space = len(teacher_names), mix_space
        self.order = teacher_order(teacher_names, order, val_accuracy)
        self.active = [self.order[: s + 1] if cumulative else [self.order[s]] for s in range(self.k)]
        self.rules = [WEIGHTINGS[weighting]([teacher_names[i] for i in act], val_accuracy=val_accuracy,
                                            **_subset_static(rule_args, teacher_names, act))
                      for act in self.active]
        self.ends = torch.tensor(stage_epochs(self.k, epochs, stage_epochs_given)).cumsum(0).tolist()

        self.names = list(teacher_names)

    def stage(self, epoch: int) -> int:
        return next((s for s, end in enumerate(self.ends) if epoch < end), self.k - 1)

    def describe(self) -> str:
        """e.g. 'a (3 ep) -> a+b (3 ep)': what MLflow shows as the ensemblekd.stages tag."""
        starts = [0, *self.ends[:-1]]
        return " -> ".join("+".join(self.names[i] for i in act) + f" ({end - start} ep)"
                           for act, start, end in zip(self.active, starts, self.ends))

    def weights(self, teacher_logits, labels, temperature, epoch: int = 0):
        s = self.stage(epoch)
        active = self.active[s]
        return _scatter(self.rules[s](teacher_logits[:, active], labels, temperature), active, self.k)


def _subset_static(rule_args: dict, teacher_names: Sequence[str], active: list[int]) -> dict:
    """Static weights restricted to the active teachers (other rules take their args unchanged)."""
    weights = rule_args.get("weights")
    if not weights:
        return rule_args
    return {**rule_args, "weights": {teacher_names[i]: weights[teacher_names[i]] for i in active}}


class Assistant(Strategy):
    """TAKD (Mirzadeh et al. 2020), one level of the chain: the targets come from the assistant
    of the level above, blended with a share `ensemble_blend` (beta) of the ensemble:

        p = beta * p_ensemble + (1 - beta) * p_assistant

    With no assistant among the teachers (the first level: the ensemble teaches), this is parallel.
    """

    def __init__(self, teacher_names: Sequence[str], weighting: str = "uniform", mix_space: str = "prob",
                 assistant_names: Sequence[str] = (), ensemble_blend: float = 0.0, val_accuracy=None, **rule_args):
        self.k, self.mix_space, self.beta = len(teacher_names), mix_space, ensemble_blend
        found = [i for i, n in enumerate(teacher_names) if n in set(assistant_names)]
        if len(found) > 1:
            raise ValueError(f"one assistant per level, got {[teacher_names[i] for i in found]}")
        self.assistant = found[0] if found else None
        self.ensemble = [i for i in range(self.k) if i != self.assistant]
        names = [teacher_names[i] for i in self.ensemble]
        self.rule = WEIGHTINGS[weighting](names, val_accuracy=val_accuracy,
                                          **_subset_static(rule_args, teacher_names, self.ensemble)) if names else None
        if self.rule is None:
            self.beta = 0.0  # only the assistant is there to teach

    def weights(self, teacher_logits, labels, temperature, epoch: int = 0):
        w = teacher_logits.new_zeros((teacher_logits.shape[0], self.k), dtype=torch.float32)
        if self.rule is not None:
            share = 1.0 if self.assistant is None else self.beta
            w = _scatter(self.rule(teacher_logits[:, self.ensemble], labels, temperature), self.ensemble, self.k) * share
        if self.assistant is not None:
            w[:, self.assistant] = 1.0 - self.beta
        return w


STRATEGIES: dict[str, type] = {"parallel": Parallel, "sequential": Sequential, "assistant": Assistant}


def build_strategy(distill_cfg, teacher_names: Sequence[str], val_accuracy: dict[str, float] | None = None,
                   epochs: int = 1):
    common = dict(weighting=distill_cfg.weighting, mix_space=distill_cfg.mix_space, weights=distill_cfg.weights,
                  gamma=distill_cfg.gamma, val_accuracy=val_accuracy)
    if distill_cfg.strategy == "sequential":
        return Sequential(teacher_names, order=distill_cfg.order, cumulative=distill_cfg.cumulative, epochs=epochs,
                          stage_epochs_given=distill_cfg.stage_epochs, **common)
    if distill_cfg.strategy == "assistant":
        return Assistant(teacher_names, assistant_names=[a.name for a in distill_cfg.assistants],
                         ensemble_blend=distill_cfg.ensemble_blend, **common)
    return STRATEGIES[distill_cfg.strategy](teacher_names, **common)
