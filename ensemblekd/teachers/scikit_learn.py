"""Kind `sklearn`: any scikit-learn-compatible classifier (gradient boosting, forests, linear models, ...).

Either `model: "sklearn.ensemble:HistGradientBoostingClassifier"` + `kwargs` + a `fit` block (the
estimator is fitted on the train split's labelled rows in a Ray task, its `random_state` set to
`fit.seed` unless kwargs give one, and saved to `checkpoint`), or a `checkpoint` alone: an estimator
saved with skops (`skops.io.dump`). Files are read with skops, which rebuilds objects without
running code from the file, and only types that are trusted are rebuilt: scikit-learn's and numpy's
own, plus those listed in `trusted` once you have reviewed them; a file holding anything else is
refused. Plain pickle files are not read.

Logits: log(predict_proba), each probability clipped below at PROBA_FLOOR (a tree that gives a
class probability 0 would otherwise give -inf); a model without predict_proba gives its
decision_function (binary: [-s/2, s/2], whose softmax is the logistic sigmoid(s)). Its classes must
be 0 .. C-1, the label column's values, so that column c is class c for every teacher.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from pydantic import Field
from torch import nn

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.data.inputs import labelled_split
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.plugins import Options, import_callable
from ensemblekd.teachers.base import TeacherKind, key_of

PROBA_FLOOR = 1e-6
TRUSTED_MODULES = ("sklearn.", "numpy.")  # types from these packages are rebuilt without asking


def estimator_logits(estimator, x: np.ndarray) -> np.ndarray:
    """float32 logits [N, C] of a fitted classifier (see the module docstring)."""
    if hasattr(estimator, "predict_proba"):
        return np.log(np.clip(estimator.predict_proba(x), PROBA_FLOOR, None)).astype(np.float32)
    scores = np.asarray(estimator.decision_function(x), dtype=np.float32)
    return np.stack([-scores / 2, scores / 2], axis=1) if scores.ndim == 1 else scores


def estimator_parameters(obj, seen: set[int] | None = None) -> int:
    """Numbers a fitted estimator keeps: its fitted arrays' elements, one per tree node for trees
    and boosted ensembles, nested estimators counted through (hyper-parameters are not counted)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.size if obj.dtype != object else sum(estimator_parameters(o, seen) for o in obj.ravel())
    if isinstance(obj, (list, tuple)):
        return sum(estimator_parameters(o, seen) for o in obj)
    if hasattr(obj, "node_count"):                        # sklearn.tree._tree.Tree
        return int(obj.node_count)
    if isinstance(getattr(obj, "nodes", None), np.ndarray):  # a histogram gradient-boosting tree
        return len(obj.nodes)
    if hasattr(obj, "get_params") and hasattr(obj, "__dict__"):
        params = obj.get_params(deep=False)
        return sum(estimator_parameters(v, seen) for k, v in vars(obj).items() if k not in params)
    return 0


class EstimatorModule(nn.Module):
    """A fitted scikit-learn classifier as a module: float features [B, F] -> logits [B, C], so
    label, evaluate and the latency timer use it like any torch teacher."""

    def __init__(self, estimator):
        super().__init__()
        self.estimator = estimator
        self.num_parameters = estimator_parameters(estimator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(estimator_logits(self.estimator, x.detach().cpu().numpy())).to(x.device)


LAST_HIDDEN = "last_hidden"
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]]
ACTIVATIONS = {"identity": lambda a: a, "relu": lambda a: np.maximum(a, 0), "tanh": np.tanh,
               "logistic": lambda a: 1 / (1 + np.exp(-a))}  # MLPClassifier's own (sklearn.neural_network)


def last_hidden(estimator, x: np.ndarray) -> np.ndarray:
    """The last hidden layer's activations [N, H] of an MLPClassifier (or of a Pipeline ending in
    one, its earlier steps applied first)."""
    if hasattr(estimator, "steps"):
        x, estimator = estimator[:-1].transform(x), estimator[-1]
    act = ACTIVATIONS[estimator.activation]
    for w, b in zip(estimator.coefs_[:-1], estimator.intercepts_[:-1]):
        x = act(x @ w + b)
    return np.asarray(x, np.float32)


def has_hidden_layer(estimator) -> bool:
    final = estimator[-1] if hasattr(estimator, "steps") else estimator
    return len(getattr(final, "coefs_", ())) > 1 and getattr(final, "activation", None) in ACTIVATIONS


class EstimatorFeatures(nn.Module):
    """An MLPClassifier teacher giving (logits, its last hidden layer)."""

    def __init__(self, module: EstimatorModule):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = last_hidden(self.module.estimator, x.detach().cpu().numpy())
        return self.module(x), torch.from_numpy(hidden).to(x.device)


class SklearnKind(TeacherKind):
    name = "sklearn"
    tasks = ("classification",)
    suffix = ".skops"
    can_fit = True

    class Options(Options):
        trusted: list[str] = Field(default_factory=list, description="types a saved estimator may hold beyond "
                                   "scikit-learn's and numpy's own (module.Class), once you have reviewed them")

    def check(self, cfg: Config, t: TeacherConfig) -> None:
        super().check(cfg, t)
        key = key_of(cfg, t)
        if t.pretrained is not None:
            raise UserError(f"{key}.pretrained: only used with kind huggingface; remove it")
        if t.fit is not None and t.model is None:
            raise UserError(f"{key}.model: fitting a teacher of kind sklearn needs model: 'module:Estimator' "
                            "(e.g. sklearn.ensemble:HistGradientBoostingClassifier)")
        if t.fit is None and t.checkpoint is None:
            raise UserError(f"{key}.checkpoint: teacher '{t.name}' needs a saved estimator (a skops file) or "
                            "model + a fit block")
        if t.feature not in (None, LAST_HIDDEN):
            raise UserError(f"{key}.feature: a scikit-learn teacher's feature is its MLP's '{LAST_HIDDEN}' layer, "
                            f"not '{t.feature}'")

    def check_files(self, cfg: Config, t: TeacherConfig) -> None:
        if t.model is not None:
            import_callable(t.model, f"{key_of(cfg, t)}.model")
        super().check_files(cfg, t)

    def spec(self, t: TeacherConfig) -> dict:
        return {"kind": self.name, "model": t.model, "kwargs": t.kwargs}

    def fingerprint(self, cfg: Config, t: TeacherConfig) -> str:
        h = hashlib.sha256(json.dumps({**self.spec(t), "trusted": sorted(self.options(cfg, t).trusted)},
                                        sort_keys=True).encode())
        h.update(fs.read_bytes(self.artifact(cfg, t)))
        return h.hexdigest()[:16]

    # -- load --------------------------------------------------------------------------------
    def load(self, cfg: Config, t: TeacherConfig) -> nn.Module:
        import skops.io

        key, uri = key_of(cfg, t), self.artifact(cfg, t)
        try:
            data = fs.read_bytes(uri)
        except FileNotFoundError:
            raise UserError(f"{key}.checkpoint: '{uri}' does not exist") from None
        try:
            found = skops.io.get_untrusted_types(data=data)
        except Exception as exc:  # noqa: BLE001 - a zip that is not a skops file, a pickle, a truncated file
            raise UserError(f"{key}.checkpoint: '{uri}' is not an estimator saved with skops ({type(exc).__name__}); "
                            "save it with skops.io.dump (plain pickle files are not read)") from None
        refused = [name for name in found if not name.startswith(TRUSTED_MODULES) and name not in self.options(cfg, t).trusted]
        if refused:
            raise UserError(f"{key}.checkpoint: '{uri}' holds types that are not trusted: {', '.join(refused)}; "
                            f"if you have reviewed them, list them in {key}.trusted")
        estimator = skops.io.loads(data, trusted=found)
        self._check_estimator(estimator, key, uri)
        return EstimatorModule(estimator).eval()

    def _check_estimator(self, estimator, key: str, where: str) -> None:
        if getattr(estimator, "classes_", None) is None:
            raise UserError(f"{key}: the estimator in '{where}' is not a fitted classifier (no classes_)")
        classes = np.asarray(estimator.classes_)
        if not np.array_equal(classes, np.arange(len(classes))):
            raise UserError(f"{key}: the estimator in '{where}' has classes {classes.tolist()[:10]}; teachers must "
                            "predict classes 0 .. C-1 (the label column's values)")
        if not (hasattr(estimator, "predict_proba") or hasattr(estimator, "decision_function")):
            raise UserError(f"{key}: {type(estimator).__name__} has neither predict_proba nor decision_function")

    def with_features(self, cfg: Config, t: TeacherConfig, model: nn.Module) -> nn.Module:
        """The last hidden layer of an MLPClassifier; other estimators have none to give."""
        if not has_hidden_layer(model.estimator):
            raise UserError(f"{key_of(cfg, t)}.feature: {type(model.estimator).__name__} has no hidden layer to take "
                            "features from (only an MLPClassifier, or a Pipeline ending in one, has); remove feature")
        return EstimatorFeatures(cast(EstimatorModule, model)).eval()  # load() gives an EstimatorModule

    # -- fit ---------------------------------------------------------------------------------
    def train(self, cfg: Config, t: TeacherConfig, task) -> float | None:
        import skops.io

        key = key_of(cfg, t)
        assert t.model is not None and t.fit is not None  # train() runs only for a teacher with fit; check()
        estimator = import_callable(t.model, f"{key}.model")(**t.kwargs)
        if not hasattr(estimator, "fit"):
            raise UserError(f"{key}.model: {t.model} returned {type(estimator).__name__}, which has no fit method")
        if "random_state" in estimator.get_params() and "random_state" not in t.kwargs:
            estimator.set_params(random_state=t.fit.seed)
        x, y = labelled_split(cfg.data, "train", f"teacher '{t.name}'")
        estimator.fit(x, y)
        self._check_estimator(estimator, key, "its fit")
        fs.write_bytes_atomic(self.artifact(cfg, t), skops.io.dumps(estimator))
        return task.accuracy(EstimatorModule(estimator), cfg, "val")
