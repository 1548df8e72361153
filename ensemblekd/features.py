"""Feature- and relation-based knowledge, offline: a model's feature (the output of one named
module), the PCA that bounds what a teacher's features cost in the store, and the student's
terms that learn from them.

A teacher's feature is stored next to its logits (float16, one row per input row), optionally
reduced to d dimensions by a PCA fitted once on the train split. The student learns from them by

  hint (FitNets, Romero et al. 2015):  Σ_k mean_b w_bk · mean_j (P_k f_s(b) − f_k(b))_j²
        P_k a learned linear projection per teacher from the student's feature to teacher k's;
  RKD distance (Park et al. 2019):     Σ_k w̄_k · Huber(ψ_D(f_s), ψ_D(f_k)),  ψ_D = pairwise
        distances in the batch over their mean;
  RKD angle:                           Σ_k w̄_k · Huber(ψ_A(f_s), ψ_A(f_k)),  ψ_A = cosines of the
        angles of every triplet of the batch,

with w the strategy's per-row teacher weights and w̄_k their batch mean: relations are properties
of the batch, not of one row. docs/features.md has the why and the costs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ensemblekd.errors import UserError

PCA_ROWS = 20_000  # train rows the PCA is fitted on (the first ones, in shard order): a covariance of them


def named_module(model: nn.Module, name: str, key: str) -> nn.Module:
    """The submodule called `name` (as model.named_modules() names it), or a UserError listing them."""
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        listed = ", ".join(f"'{n}' ({type(m).__name__})" for n, m in list(modules.items())[1:13])
        more = ", ..." if len(modules) > 13 else ""
        raise UserError(f"{key}: '{name}' is not a module of {type(model).__name__}; its modules are {listed}{more}")
    return modules[name]


class FeatureTap:
    """Keeps the flattened output of one module from each forward (a forward hook)."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._keep)

    def _keep(self, module, inputs, output) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.value = out.flatten(1)

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("the feature module did not run in this forward")
        return value


class WithFeatures(nn.Module):
    """A teacher whose forward gives (logits, its feature [B, F]): the module `name`'s output."""

    def __init__(self, model: nn.Module, name: str, key: str):
        super().__init__()
        self.model = model
        self.tap = FeatureTap(named_module(model, name, key))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, self.tap.take()


class Projected(nn.Module):
    """A (logits, feature) teacher whose feature is reduced by a PCA: (f − mean) @ components."""

    def __init__(self, model: nn.Module, mean: np.ndarray, components: np.ndarray):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(np.asarray(mean), dtype=torch.float32))  # a copy: Ray's arrays are read-only
        self.register_buffer("components", torch.tensor(np.asarray(components), dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feature = self.model(x)
        return logits, (feature.float() - self.mean) @ self.components


def fit_pca(features: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean [F], components [F, dim]) of the rows' top `dim` principal directions, from the
    covariance's eigenvectors (float64), each signed so that its largest entry is positive: the
    same features give the same projection anywhere."""
    x = np.asarray(features, np.float64)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, len(x) - 1)
    _, vectors = np.linalg.eigh(cov)                       # ascending eigenvalues
    top = vectors[:, ::-1][:, :dim]
    signs = np.sign(top[np.abs(top).argmax(0), np.arange(top.shape[1])])
    return mean.astype(np.float32), (top * np.where(signs == 0, 1.0, signs)).astype(np.float32)


# -- the student ----------------------------------------------------------------------------------
class StudentWithFeatures(nn.Module):
    """The student, its feature tapped, and with `hint` one projection per teacher onto that
    teacher's feature width (teacher_dims, the order of the teachers' features side by side in a
    batch). forward(x) gives the logits, as the bare student does; the feature and its projections
    of that forward are kept in `features` and `hints` for the loss. The projections run inside
    forward so that DeepSpeed sees them (ZeRO-3 gathers a module's parameters as it runs). Only
    `student` is saved as the student."""

    def __init__(self, student: nn.Module, feature: str, teacher_dims: list[int], hint: bool, width: int,
                 key: str = "student.feature"):
        super().__init__()
        self.student = student
        self.tap = FeatureTap(named_module(student, feature, key))
        self.teacher_dims = list(teacher_dims)
        self.projections = nn.ModuleList(nn.Linear(width, d) for d in teacher_dims) if hint else nn.ModuleList()
        self.features: torch.Tensor | None = None
        self.hints: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.student(x)
        self.features = self.tap.take().float()
        self.hints = [p(self.features) for p in self.projections]
        return logits

    def split(self, teacher_features: torch.Tensor) -> list[torch.Tensor]:
        """A batch's teacher features [B, d_1 + ... + d_K] as one [B, d_k] per teacher."""
        return list(teacher_features.split(self.teacher_dims, dim=1))


def student_with_features(student: nn.Module, feature: str, teacher_dims: list[int], hint: bool,
                          example: torch.Tensor, key: str = "student.feature") -> StudentWithFeatures:
    """StudentWithFeatures, the width of the student's feature read from a forward on `example`."""
    tap = FeatureTap(named_module(student, feature, key))
    with torch.no_grad():
        student(example)
    width = tap.take().shape[1]
    tap.handle.remove()
    return StudentWithFeatures(student, feature, teacher_dims, hint, width, key)


# -- the terms ------------------------------------------------------------------------------------
def hint_loss(hints: list[torch.Tensor], teacher_features: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σ_k mean_b w_bk · mean_j (hint_k − f_k)²: hints [B, d_k] the student's projections,
    teacher_features [B, d_k], weights [B, K]."""
    per_row = torch.stack([(h - t.float()).pow(2).mean(-1) for h, t in zip(hints, teacher_features)], dim=1)
    return (weights.float() * per_row).mean(0).sum()


def _distances(e: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances [B, B], divided by the mean of the off-diagonal ones; the
    square root is taken of a clamped square so that the diagonal (0) has a finite gradient."""
    sq = (e.unsqueeze(0) - e.unsqueeze(1)).pow(2).sum(-1)
    d = sq.clamp_min(1e-12).sqrt() * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))
    off = d[d > 0]
    return d / off.mean() if len(off) else d


def rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the batch's normalised pairwise distances (Park et al. 2019, eq. 4-5)."""
    with torch.no_grad():
        target = _distances(teacher.float())
    return F.smooth_l1_loss(_distances(student.float()), target)


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos ∠(e_i, e_j, e_k) = <(e_i − e_j)/|.|, (e_k − e_j)/|.|> for every triplet: [B³]."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)   # [j, i] = e_i − e_j, unit
    return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)


def rkd_angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Huber loss between the batch's triplet angle cosines (Park et al. 2019, eq. 6-7)."""
    with torch.no_grad():
        target = _angles(teacher.float())
    return F.smooth_l1_loss(_angles(student.float()), target)


def relation_loss(term, student: torch.Tensor, teacher_features: list[torch.Tensor],
                  weights: torch.Tensor) -> torch.Tensor:
    """Σ_k w̄_k term(f_s, f_k), w̄_k the batch's mean weight of teacher k."""
    mean_w = weights.float().mean(0)
    return sum(mean_w[k] * term(student, t) for k, t in enumerate(teacher_features))


def feature_terms(student: StudentWithFeatures, teacher_features: list[torch.Tensor], weights: torch.Tensor,
                  hint: bool, distance: bool, angle: bool) -> dict[str, torch.Tensor]:
    """The enabled terms of the last forward of `student` (unweighted), by name."""
    terms = {}
    if hint:
        terms["hint"] = hint_loss(student.hints, teacher_features, weights)
    if distance:
        assert student.features is not None, "feature_terms before the student's forward"
        terms["rkd_distance"] = relation_loss(rkd_distance, student.features, teacher_features, weights)
    if angle:
        assert student.features is not None, "feature_terms before the student's forward"
        terms["rkd_angle"] = relation_loss(rkd_angle, student.features, teacher_features, weights)
    return terms
