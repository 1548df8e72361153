"""Kind `sklearn`: any scikit-learn-compatible classifier (gradient boosting, forests, linear models,
text pipelines, ...).

Either `model: "sklearn.ensemble:HistGradientBoostingClassifier"` + `kwargs` + a `fit` block (the
estimator is fitted on the labelled rows of the train split, as the task reads them, in a Ray task,
its `random_state` set to `fit.seed` unless kwargs give one, as are those of the estimators it holds
(a Pipeline's steps) left None, and saved to `checkpoint`), or a `checkpoint` alone: an estimator
saved with skops (`skops.io.dump`).

What it reads is the task's input batch: a float feature matrix [B, F] (task classification), or,
for task text, the raw texts (a list of strings), passed as they are to the estimator, so a text
teacher is a Pipeline that does its own tokenizing, e.g. TfidfVectorizer then LogisticRegression.

Files are read with skops, which rebuilds objects without running code from the file, and only
types that are trusted are rebuilt: those skops trusts itself (plain builtin values, dict, list,
set, tuple, numpy arrays, ...), scikit-learn's and numpy's own (TRUSTED_MODULES), scipy's sparse
matrices (a sparsified linear model's coef_; data only, unlike the rest of scipy, whose functions
may read files), frozenset and range (TRUSTED_TYPES; builtin containers of values, which skops 0.16
still lists), and those listed in `trusted` once you have reviewed them; a file holding anything
else, such as a preprocessor or tokenizer function of your own, is refused with the types named. A
fitted TF-IDF pipeline needs nothing beyond these. Plain pickle and joblib files are never read:
loading one runs code from the file; the message gives the command that converts one you have
reviewed to skops.

Logits: log(predict_proba), each probability clipped below at PROBA_FLOOR (a tree that gives a
class probability 0 would otherwise give -inf); a model without predict_proba gives its
decision_function (binary: [-s/2, s/2], whose softmax is the logistic sigmoid(s)). Its classes must
be 0 .. C-1, the label column's values, so that column c is class c for every teacher.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch
from pydantic import Field
from scipy import sparse
from torch import nn

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.plugins import Options, import_callable
from ensemblekd.teachers.base import TeacherKind, key_of

PROBA_FLOOR = 1e-6
TRUSTED_MODULES = ("sklearn.", "numpy.", "scipy.sparse.")  # types from these are rebuilt without asking
TRUSTED_TYPES = ("builtins.frozenset", "builtins.range")   # and these builtin containers (module docstring)
PICKLE_MARKER = b"\x80"   # a pickle of protocol 2 or later (joblib.dump's too) starts with it
ZIP_MARKER = b"PK"        # a skops file is a zip
TRAINING_STATE = frozenset({"_best_coefs", "_best_intercepts"})  # MLP: copies kept while fitting, not used to predict


def estimator_logits(estimator, x) -> np.ndarray:
    """float32 logits [N, C] of a fitted classifier on a batch it takes (a feature matrix, or a
    list of texts for a text pipeline; see the module docstring)."""
    if hasattr(estimator, "predict_proba"):
        return np.log(np.clip(estimator.predict_proba(x), PROBA_FLOOR, None)).astype(np.float32)
    scores = np.asarray(estimator.decision_function(x), dtype=np.float32)
    return np.stack([-scores / 2, scores / 2], axis=1) if scores.ndim == 1 else scores


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _estimators_in(value) -> Iterator[Any]:
    """The estimators a value holds: itself, or those in its lists, tuples, dicts and object arrays."""
    if hasattr(value, "get_params") and not isinstance(value, type):
        yield value
    elif isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.dtype == object):
        for v in value:
            yield from _estimators_in(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _estimators_in(v)


def estimator_parameters(obj, seen: set[int] | None = None) -> int:
    """Numbers a fitted estimator keeps: its fitted arrays' elements (a sparse one's stored values),
    one per tree node for trees and boosted ensembles, one per entry of a fitted dict (a vectorizer's
    vocabulary_), nested estimators counted through, each object once. Hyper-parameters are not
    counted, except the estimators they hold when the estimator keeps no fitted ones of its own: a
    Pipeline or FeatureUnion fits its steps in place, whereas ColumnTransformer, VotingClassifier,
    StackingClassifier, bagging, ... fit clones, kept in transformers_, estimators_, ..."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.size if obj.dtype != object else sum(estimator_parameters(o, seen) for o in obj.ravel())
    if sparse.issparse(obj):
        return int(obj.nnz)
    if isinstance(obj, (list, tuple)):
        return sum(estimator_parameters(o, seen) for o in obj)
    if isinstance(obj, dict):  # numbers not through `seen`: small ints are shared objects
        return sum(1 if _is_number(v) else estimator_parameters(v, seen) for v in obj.values())
    if hasattr(obj, "node_count"):                        # sklearn.tree._tree.Tree
        return int(obj.node_count)
    if isinstance(getattr(obj, "nodes", None), np.ndarray):  # a histogram gradient-boosting tree
        return len(obj.nodes)
    if hasattr(obj, "get_params") and hasattr(obj, "__dict__") and not isinstance(obj, type):
        params = obj.get_params(deep=False)
        fitted = [v for k, v in vars(obj).items() if k not in params and k not in TRAINING_STATE]
        n = sum(estimator_parameters(v, seen) for v in fitted)
        if not any(True for v in fitted for _ in _estimators_in(v)):
            n += sum(estimator_parameters(e, seen) for v in params.values() for e in _estimators_in(v))
        return n
    return 0


def _batch(x):
    """What the estimator takes: a tensor as a numpy array, anything else (a list of texts) as it is."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _tensor(a: np.ndarray, like) -> torch.Tensor:
    """A numpy result as a tensor on the input's device (CPU for a list of texts)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(like.device) if isinstance(like, torch.Tensor) else t


class EstimatorModule(nn.Module):
    """A fitted scikit-learn classifier as a module: a batch (float features [B, F], or a list of B
    texts for a text pipeline) -> float32 logits [B, C], so label, evaluate and the latency timer use
    it like any torch teacher."""

    def __init__(self, estimator):
        super().__init__()
        self.estimator = estimator
        self.num_parameters = estimator_parameters(estimator)

    def forward(self, x: torch.Tensor | list[str]) -> torch.Tensor:
        return _tensor(estimator_logits(self.estimator, _batch(x)), x)


LAST_HIDDEN = "last_hidden"
ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]]
ACTIVATIONS = {"identity": lambda a: a, "relu": lambda a: np.maximum(a, 0), "tanh": np.tanh,
               "logistic": lambda a: 1 / (1 + np.exp(-a))}  # MLPClassifier's own (sklearn.neural_network)


def last_hidden(estimator, x) -> np.ndarray:
    """The last hidden layer's activations [N, H] of an MLPClassifier (or of a Pipeline ending in
    one, its earlier steps applied first: a TfidfVectorizer's takes texts)."""
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

    def forward(self, x: torch.Tensor | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(x), _tensor(last_hidden(self.module.estimator, _batch(x)), x)


def not_skops(key: str, uri: str, data: bytes) -> str:
    """Why a checkpoint that is not a zip is not read, and how to convert it when it is a pickle."""
    stem, suffix = posixpath.splitext(uri)
    out = f"{stem}.converted.skops" if suffix == ".skops" else f"{stem}.skops"  # never over the file itself
    convert = (f"convert one you have reviewed with: python -c \"import joblib, skops.io; "
               f"skops.io.dump(joblib.load({uri!r}), {out!r})\" and set {key}.checkpoint to {out}")
    if data.startswith(PICKLE_MARKER):
        return (f"{key}.checkpoint: '{uri}' is a pickle (joblib/pickle) file, which is never read because "
                f"loading one runs code from the file; {convert}")
    return (f"{key}.checkpoint: '{uri}' is not a skops file (not a zip); a pickle (joblib/pickle) file is "
            f"never read because loading one runs code from the file; if it is one, {convert}")


def seeds(params: dict[str, Any], kwargs: dict[str, Any], seed: int) -> dict[str, int]:
    """The random_state params fit.seed sets: the estimator's own unless kwargs give one, and those of
    the estimators it holds (a Pipeline's steps: step__random_state) that were left None."""
    own = {"random_state": seed} if "random_state" in params and "random_state" not in kwargs else {}
    return {**own, **{k: seed for k, v in params.items() if k.endswith("__random_state") and v is None}}


class SklearnKind(TeacherKind):
    name = "sklearn"
    tasks = ("classification", "text")
    suffix = ".skops"
    can_fit = True

    class Options(Options):
        trusted: list[str] = Field(default_factory=list, description="types a saved estimator may hold beyond "
                                   "scikit-learn's, numpy's and scipy.sparse's own (module.Class), once you have "
                                   "reviewed them")

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
        if not data.startswith(ZIP_MARKER):  # a pickle, a joblib file (compressed or not), anything else
            raise UserError(not_skops(key, uri, data))
        try:
            found = skops.io.get_untrusted_types(data=data)
        except Exception as exc:  # noqa: BLE001 - a zip that is not a skops file, a truncated file
            raise UserError(f"{key}.checkpoint: '{uri}' is not an estimator saved with skops ({type(exc).__name__}); "
                            "save it with skops.io.dump (plain pickle files are not read)") from None
        trusted = self.options(cfg, t).trusted
        refused = [name for name in found
                   if not name.startswith(TRUSTED_MODULES) and name not in TRUSTED_TYPES and name not in trusted]
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
        estimator.set_params(**seeds(estimator.get_params(), t.kwargs, t.fit.seed))
        x, y = task.labelled(cfg, "train", f"teacher '{t.name}'")  # features, or texts (task text)
        estimator.fit(x, y)
        self._check_estimator(estimator, key, "its fit")
        fs.write_bytes_atomic(self.artifact(cfg, t), skops.io.dumps(estimator))
        return task.accuracy(EstimatorModule(estimator), cfg, "val")
