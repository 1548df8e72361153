"""Small built-in models, referenced from configs as 'ensemblekd.models:NAME', and the helpers that
build any 'module:callable' torch model from a config and load or save its weights.

Any 'module:callable' returning a torch.nn.Module that maps a float batch [B, F] to logits [B, C]
works as a teacher or student; these are the ones the demo and tests use.
"""

from __future__ import annotations

import io
import math
from typing import Any

import torch
from torch import nn

from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.plugins import import_callable


def mlp(in_features: int, num_classes: int, hidden: list[int] | tuple[int, ...] = (128,), dropout: float = 0.0) -> nn.Module:
    """A ReLU MLP: in_features -> hidden... -> num_classes."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _ToImage(nn.Module):
    def __init__(self, side: int):
        super().__init__()
        self.side = side

    def forward(self, x):
        return x.view(x.shape[0], 1, self.side, self.side)


def cnn(in_features: int, num_classes: int, channels: list[int] | tuple[int, ...] = (16, 32), hidden: int = 64) -> nn.Module:
    """A small CNN over a square one-channel image given as a flat feature row (digits: 8x8)."""
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ValueError(f"cnn needs a square image; in_features={in_features} is not a square")
    layers: list[nn.Module] = [_ToImage(side)]
    c_in = 1
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        c_in = c
    layers += [nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c_in * (side // 2) ** 2, hidden), nn.ReLU(),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


# -- scikit-learn text classifiers (task text, kind sklearn) -----------------------------------
def tfidf_logistic(ngram_range: list[int] | tuple[int, int] = (1, 2), analyzer: str = "word", min_df: int = 1,
                   C: float = 10.0, max_iter: int = 2000):
    """TF-IDF (sublinear term frequencies) + logistic regression: a Pipeline that reads raw text."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(ngram_range=tuple(ngram_range), analyzer=analyzer, min_df=min_df,
                                         sublinear_tf=True), LogisticRegression(C=C, max_iter=max_iter))


def tfidf_naive_bayes(ngram_range: list[int] | tuple[int, int] = (2, 4), analyzer: str = "char_wb", min_df: int = 2,
                      alpha: float = 0.1):
    """Character n-gram TF-IDF + complement naive Bayes: a Pipeline that reads raw text, and errs
    differently from a linear model over words."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.naive_bayes import ComplementNB
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(ngram_range=tuple(ngram_range), analyzer=analyzer, min_df=min_df,
                                         sublinear_tf=True), ComplementNB(alpha=alpha))


# -- any torch model from a config ------------------------------------------------------------
def build_module(model: str, kwargs: dict[str, Any], key: str = "model") -> nn.Module:
    """Call the 'module:callable' `model` with kwargs; a UserError naming `key` if that fails or
    returns something other than a torch.nn.Module."""
    try:
        module = import_callable(model, key)(**kwargs)
    except TypeError as exc:
        raise UserError(f"{key}: {model}(**kwargs) failed ({exc}); fix the kwargs") from None
    if not isinstance(module, nn.Module):
        raise UserError(f"{key}: {model} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def load_state(module: nn.Module, uri: str, who: str) -> nn.Module:
    """Load a state dict (weights only: torch.load never runs code from it) into module; eval mode."""
    try:
        state = torch.load(io.BytesIO(fs.read_bytes(uri)), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{who}: checkpoint '{uri}' does not exist") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise UserError(f"{who}: '{uri}' is not a torch state dict ({type(exc).__name__})") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{who}: checkpoint '{uri}' does not match the model ({first})") from None
    return module.eval()


def save_state(module: nn.Module, uri: str) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    fs.write_bytes_atomic(uri, buf.getvalue())


def build_student(student_cfg) -> nn.Module:
    """The student as config section `student` builds it (student.init's pruned weights, where given)."""
    assert student_cfg.model is not None, "the config sets student.model, or student.init does"
    return build_module(student_cfg.model, student_cfg.kwargs, "student.model")


def load_student(student_cfg, uri: str) -> nn.Module:
    """The student (config section `student`) with the weights at `uri`: for evaluation and serving."""
    return load_state(build_student(student_cfg), uri, "student")


def count_parameters(model: nn.Module) -> int:
    """Trainable numbers in a model; a module that wraps another framework's model (a scikit-learn
    teacher) says how many it has with a `num_parameters` attribute."""
    own = getattr(model, "num_parameters", None)  # a Hugging Face model's is a method: its parameters are torch's
    return int(own) if own is not None and not callable(own) else sum(p.numel() for p in model.parameters())
