"""Kind sklearn: logits from predict_proba (clipped) or decision_function, parameters counted from
the fitted estimator, skops files read with only trusted types, and config mistakes refused in one
line. No Ray: the kind is exercised directly on files in tmp_path."""

import pickle

import numpy as np
import pytest
import skops.io
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

import ensemblekd as ekd
from ensemblekd.errors import UserError
from ensemblekd.models import count_parameters
from ensemblekd.teachers import kind_of
from ensemblekd.teachers.scikit_learn import PROBA_FLOOR, EstimatorModule, estimator_logits, estimator_parameters
from ensemblekd.testing import tiny_config

RNG = np.random.default_rng(0)
X = RNG.normal(size=(120, 4)).astype(np.float32)
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)  # classes 0, 1, 2


class ReviewedLR(LogisticRegression):
    """A user's own estimator class: not scikit-learn's, so not trusted until listed."""


def sklearn_teacher(tmp_path, digits_dir, **teacher):
    cfg = tiny_config(tmp_path, digits_dir)
    cfg["teachers"][1] = {"name": "forest", "kind": "sklearn", **teacher}
    return cfg


def test_logits_are_log_probabilities_clipped_at_the_floor():
    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(X, Y)
    z = estimator_logits(forest, X)
    p = forest.predict_proba(X)
    assert z.dtype == np.float32 and z.shape == (len(X), 3)
    assert (p == 0).any()                                             # trees give exact zeros ...
    np.testing.assert_allclose(z, np.log(np.maximum(p, PROBA_FLOOR)), rtol=1e-6)
    assert z.min() == pytest.approx(np.log(PROBA_FLOOR))              # ... which become log(floor), not -inf
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(z), -1).numpy(), p, atol=1e-5)


def test_a_model_without_probabilities_gives_its_decision_function():
    binary = (Y > 0).astype(np.int64)
    svm = LinearSVC(random_state=0).fit(X, binary)
    z = estimator_logits(svm, X)
    s = svm.decision_function(X)
    np.testing.assert_allclose(z, np.stack([-s / 2, s / 2], 1), rtol=1e-5)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(z), -1)[:, 1].numpy(), 1 / (1 + np.exp(-s)), rtol=1e-5)


def test_parameters_are_the_fitted_numbers():
    lr = LogisticRegression(max_iter=200).fit(X, Y)
    assert estimator_parameters(lr) == lr.coef_.size + lr.intercept_.size + lr.classes_.size + lr.n_iter_.size
    forest = RandomForestClassifier(n_estimators=4, random_state=0).fit(X, Y)
    nodes = sum(tree.tree_.node_count for tree in forest.estimators_)
    assert nodes <= estimator_parameters(forest) <= nodes + 100       # nodes, plus a few small fitted arrays
    assert EstimatorModule(forest).num_parameters == estimator_parameters(forest)
    assert count_parameters(EstimatorModule(forest)) == estimator_parameters(forest)  # what evaluate reports


def test_a_saved_estimator_loads_and_predicts(tmp_path, digits_dir):
    path = tmp_path / "lr.skops"
    lr = LogisticRegression(max_iter=200).fit(X, Y)
    skops.io.dump(lr, path)
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path)))
    t = cfg.teachers[1]
    module = kind_of(t).load(cfg, t)
    want = np.log(np.maximum(lr.predict_proba(X), PROBA_FLOOR))
    np.testing.assert_allclose(module(torch.from_numpy(X)).numpy(), want, rtol=1e-5)


def test_an_untrusted_type_is_refused_in_one_line_until_listed(tmp_path, digits_dir):
    path = tmp_path / "mine.skops"
    skops.io.dump(ReviewedLR(max_iter=200).fit(X, Y), path)
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path)))
    t = cfg.teachers[1]
    with pytest.raises(UserError) as exc:
        kind_of(t).load(cfg, t)
    msg = str(exc.value)
    assert "\n" not in msg and "not trusted" in msg and "ReviewedLR" in msg and "teachers.1.trusted" in msg
    listed = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path),
                                             trusted=[f"{ReviewedLR.__module__}.ReviewedLR"]))
    t = listed.teachers[1]
    assert isinstance(kind_of(t).load(listed, t).estimator, ReviewedLR)
    assert kind_of(t).fingerprint(listed, t) != kind_of(cfg.teachers[1]).fingerprint(cfg, cfg.teachers[1])


def test_a_pickle_file_is_refused(tmp_path, digits_dir):
    path = tmp_path / "lr.pkl"
    path.write_bytes(pickle.dumps(LogisticRegression().fit(X, Y)))
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path)))
    with pytest.raises(UserError, match="not an estimator saved with skops"):
        kind_of(cfg.teachers[1]).load(cfg, cfg.teachers[1])


def test_classes_must_be_the_label_values(tmp_path, digits_dir):
    path = tmp_path / "shifted.skops"
    skops.io.dump(LogisticRegression(max_iter=200).fit(X, Y + 3), path)
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path)))
    with pytest.raises(UserError, match=r"classes \[3, 4, 5\]"):
        kind_of(cfg.teachers[1]).load(cfg, cfg.teachers[1])


@pytest.mark.parametrize("teacher, message", [
    ({"fit": {"seed": 0}}, "teachers.1.model: fitting a teacher of kind sklearn needs model"),
    ({"model": "sklearn.ensemble:RandomForestClassifier"}, "teachers.1.checkpoint: teacher 'forest' needs a saved"),
    ({"pretrained": "some/dir", "checkpoint": "x.skops"}, "teachers.1.pretrained: only used with kind huggingface"),
    ({"kind": "onnx", "checkpoint": "x.onnx"}, "unknown kind 'onnx'"),
])
def test_config_mistakes_are_one_line(tmp_path, digits_dir, teacher, message):
    with pytest.raises(UserError) as exc:
        ekd.load_config(sklearn_teacher(tmp_path, digits_dir, **teacher), check=False)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_sklearn_teaches_classification_only(tmp_path, digits_dir):
    cfg = sklearn_teacher(tmp_path, digits_dir, model="sklearn.ensemble:RandomForestClassifier", fit={})
    cfg.update(task="token")
    cfg["data"]["vocab_size"] = 64
    with pytest.raises(UserError, match="kind sklearn, which teaches task classification, not token"):
        ekd.load_config(cfg, check=False)


def test_default_artifact_is_a_skops_file(tmp_path, digits_dir):
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, model="sklearn.ensemble:RandomForestClassifier",
                                          fit={}), check=False)
    assert kind_of(cfg.teachers[1]).artifact(cfg, cfg.teachers[1]).endswith("teachers/forest.skops")
