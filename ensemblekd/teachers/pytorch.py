"""Kind `torch`: `model: "module:callable"` returning a torch.nn.Module, with `kwargs`, and a state
dict at `checkpoint` (any fsspec URI), or a `fit` block that trains it from scratch with the task's
loss (fitting.fit_module)."""

from __future__ import annotations

import torch
from torch import nn

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.features import WithFeatures
from ensemblekd.models import build_module, load_state, save_state
from ensemblekd.plugins import import_callable
from ensemblekd.teachers.base import TeacherKind, key_of


class TorchKind(TeacherKind):
    name = "torch"
    tasks = ("classification", "token")
    can_fit = True

    def check(self, cfg: Config, t: TeacherConfig) -> None:
        super().check(cfg, t)
        key = key_of(cfg, t)
        if t.model is None or t.pretrained is not None:
            raise UserError(f"{key}: teacher '{t.name}' needs either model (+ checkpoint or fit) or pretrained")
        if t.checkpoint is None and t.fit is None:
            raise UserError(f"{key}.checkpoint: teacher '{t.name}' needs a checkpoint URI or a fit block")

    def check_files(self, cfg: Config, t: TeacherConfig) -> None:
        assert t.model is not None  # check() requires it
        import_callable(t.model, f"{key_of(cfg, t)}.model")
        super().check_files(cfg, t)

    def load(self, cfg: Config, t: TeacherConfig) -> nn.Module:
        key = key_of(cfg, t)
        assert t.model is not None  # check() requires it
        return load_state(build_module(t.model, t.kwargs, f"{key}.model"), self.artifact(cfg, t), key)

    def with_features(self, cfg: Config, t: TeacherConfig, model: nn.Module) -> nn.Module:
        """`feature` names a module (model.named_modules()); its output, flattened, is the feature."""
        assert t.feature is not None  # called only for a teacher with a feature
        return WithFeatures(model, t.feature, f"{key_of(cfg, t)}.feature").eval()

    def train(self, cfg: Config, t: TeacherConfig, task) -> float | None:
        assert t.model is not None and t.fit is not None  # train() runs only for a teacher with fit; check()
        torch.manual_seed(t.fit.seed)
        model = build_module(t.model, t.kwargs, f"teacher '{t.name}'.model")
        task.fit(model, cfg, t)
        save_state(model, self.artifact(cfg, t))
        return task.accuracy(model, cfg, "val")
