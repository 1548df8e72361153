"""Kind sklearn: logits from predict_proba (clipped) or decision_function, on features or raw
texts, parameters counted from the fitted estimator (through Pipelines and other meta-estimators),
skops files read with only trusted types, pickles refused with the command that converts them, and
config mistakes refused in one line. No Ray: the kind is exercised directly on files in tmp_path."""

import pickle
import re
import subprocess
import sys
import zipfile

import joblib
import numpy as np
import pytest
import skops.io
import torch
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_digits
from sklearn.ensemble import RandomForestClassifier, VotingClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

import ensemblekd as ekd
from ensemblekd.errors import UserError
from ensemblekd.models import count_parameters
from ensemblekd.teachers import kind_of
from ensemblekd.teachers.scikit_learn import (PROBA_FLOOR, EstimatorFeatures, EstimatorModule, estimator_logits,
                                               estimator_parameters)
from ensemblekd.testing import tiny_config

RNG = np.random.default_rng(0)
X = RNG.normal(size=(120, 4)).astype(np.float32)
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)  # classes 0, 1, 2


TEXTS = np.array([f"{w} {v} film number {i}" for i in range(12) for w, v in (("good", "great"), ("bad", "awful"),
                                                                               ("dull", "boring"))], dtype=object)
TEXT_Y = np.tile(np.arange(3), 12).astype(np.int64)  # good 0, bad 1, dull 2


class ReviewedLR(LogisticRegression):
    """A user's own estimator class: not scikit-learn's, so not trusted until listed."""


def shout(text):
    """A user's own preprocessor: code, so a file holding it is refused until it is listed."""
    return text.upper()


def text_pipeline(**kwargs):
    """A text teacher: TF-IDF over word 1-2 grams, then a logistic regression (model: 'module:text_pipeline')."""
    return Pipeline([("tfidf", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                     ("clf", LogisticRegression(max_iter=1000, **kwargs))])


class TextTask:
    """Stands in for task text: what SklearnKind.train asks of a task (labelled rows, accuracy)."""

    def __init__(self):
        self.asked = []

    def labelled(self, cfg, split, who):
        self.asked.append((split, who))
        return TEXTS, TEXT_Y

    def accuracy(self, model, cfg, split):
        return float((model(list(TEXTS)).argmax(-1).numpy() == TEXT_Y).mean())


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
    sparse_lr = LogisticRegression(max_iter=200).fit(X, Y).sparsify()               # coef_ a scipy sparse matrix
    assert estimator_parameters(sparse_lr) == sparse_lr.coef_.nnz + 3 + 3 + 1


def test_a_pipeline_counts_every_fitted_step():
    """Pipeline.get_params lists its steps, which are fitted in place: they count (they used to give 0)."""
    x, y = load_digits(return_X_y=True)
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", MLPClassifier(hidden_layer_sizes=(64,), max_iter=30,
                                                                        random_state=0))])
    with pytest.warns(Warning):  # not converged in 30 epochs
        pipe.fit(x, y)
    scaler, mlp = pipe.named_steps["scale"], pipe.named_steps["mlp"]
    weights = sum(a.size for a in mlp.coefs_ + mlp.intercepts_)                     # 64*64 + 64 + 64*10 + 10
    assert weights == 4810
    want = weights + mlp.classes_.size + scaler.mean_.size + scaler.scale_.size + scaler.var_.size
    assert estimator_parameters(pipe) == want == 5012                              # the MLP's early-stopping copies
    assert EstimatorModule(pipe).num_parameters == want                            # of its weights not counted

    text = text_pipeline().fit(TEXTS, TEXT_Y)
    tfidf, lr = text.named_steps["tfidf"], text.named_steps["clf"]
    n = estimator_parameters(text)
    assert n > len(tfidf.vocabulary_) + lr.coef_.size
    assert n == len(tfidf.vocabulary_) + tfidf.idf_.size + lr.coef_.size + lr.intercept_.size + 3 + lr.n_iter_.size


def test_meta_estimators_count_their_fitted_estimators_once():
    voting = VotingClassifier([("lr", LogisticRegression(max_iter=200)),
                               ("forest", RandomForestClassifier(n_estimators=3, random_state=0))],
                              voting="soft").fit(X, Y)
    parts = sum(estimator_parameters(e) for e in voting.estimators_)
    assert estimator_parameters(voting) == parts + voting.classes_.size  # estimators_ (and named_estimators_) once
    columns = Pipeline([("cols", ColumnTransformer([("scale", StandardScaler(), [0, 1])], remainder="passthrough")),
                        ("lr", LogisticRegression(max_iter=200))]).fit(X, Y)
    scaler = columns.named_steps["cols"].named_transformers_["scale"]
    assert estimator_parameters(columns) == 3 * 2 + estimator_parameters(columns.named_steps["lr"])
    assert scaler is not columns.named_steps["cols"].transformers[0][1]  # the fitted clone, not the template


def test_a_module_takes_texts_and_gives_logits_on_the_cpu():
    pipe = text_pipeline().fit(TEXTS, TEXT_Y)
    z = EstimatorModule(pipe)(["some good text", "other"])
    assert z.dtype == torch.float32 and z.shape == (2, 3) and z.device.type == "cpu"
    want = np.log(np.clip(pipe.predict_proba(["some good text", "other"]), PROBA_FLOOR, None))
    np.testing.assert_allclose(z.numpy(), want, rtol=1e-6)
    mlp = Pipeline([("tfidf", TfidfVectorizer()), ("mlp", MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs",
                                                                         random_state=0))]).fit(TEXTS, TEXT_Y)
    logits, hidden = EstimatorFeatures(EstimatorModule(mlp))(["a good film", "a dull one"])
    assert logits.shape == (2, 3) and hidden.shape == (2, 8) and hidden.dtype == torch.float32
    w, b = mlp[-1].coefs_[0], mlp[-1].intercepts_[0]
    np.testing.assert_allclose(hidden.numpy(), np.maximum(mlp[0].transform(["a good film", "a dull one"]) @ w + b, 0),
                               rtol=1e-5)


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


def refusal(tmp_path, digits_dir, path, **teacher) -> str:
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path), **teacher))
    with pytest.raises(UserError) as exc:
        kind_of(cfg.teachers[1]).load(cfg, cfg.teachers[1])
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("name, dump", [("lr.pkl", lambda est, path: path.write_bytes(pickle.dumps(est))),
                                        ("lr.joblib", joblib.dump)])
def test_a_pickle_file_is_refused_with_the_command_that_converts_it(tmp_path, digits_dir, name, dump):
    path = tmp_path / name
    dump(LogisticRegression(max_iter=200).fit(X, Y), path)
    msg = refusal(tmp_path, digits_dir, path)
    assert msg.startswith(f"teachers.1.checkpoint: '{path}' is a pickle (joblib/pickle) file, which is never read")
    assert "skops.io.dump(joblib.load(" in msg and f"'{tmp_path / 'lr.skops'}'" in msg
    command = re.search(r'python -c "([^"]+)"', msg).group(1)          # the command works, as given
    subprocess.run([sys.executable, "-c", command], check=True, timeout=120)
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(tmp_path / "lr.skops")))
    assert isinstance(kind_of(cfg.teachers[1]).load(cfg, cfg.teachers[1]).estimator, LogisticRegression)


def test_a_compressed_joblib_file_misnamed_skops_is_refused_and_converted_beside_it(tmp_path, digits_dir):
    path = tmp_path / "lr.skops"
    joblib.dump(LogisticRegression(max_iter=200).fit(X, Y), path, compress=3)  # zlib: no pickle marker
    msg = refusal(tmp_path, digits_dir, path)
    assert "is not a skops file (not a zip)" in msg and "skops.io.dump(joblib.load(" in msg
    assert f"'{tmp_path / 'lr.converted.skops'}'" in msg                      # never over the file itself


def test_other_files_that_are_not_skops_keep_their_message(tmp_path, digits_dir):
    other = tmp_path / "other.skops"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("notes.txt", "not an estimator")
    assert "is not an estimator saved with skops" in refusal(tmp_path, digits_dir, other)
    cut = tmp_path / "cut.skops"
    cut.write_bytes(skops.io.dumps(LogisticRegression(max_iter=200).fit(X, Y))[:200])
    assert "is not an estimator saved with skops" in refusal(tmp_path, digits_dir, cut)


def test_a_text_pipeline_loads_without_listing_types(tmp_path, digits_dir):
    path = tmp_path / "text.skops"
    pipe = text_pipeline().fit(TEXTS, TEXT_Y)
    path.write_bytes(skops.io.dumps(pipe))
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path)))
    module = kind_of(cfg.teachers[1]).load(cfg, cfg.teachers[1])
    z = module(["some text", "other"])
    assert z.dtype == torch.float32 and z.shape == (2, 3)
    want = np.log(np.clip(pipe.predict_proba(["some text", "other"]), PROBA_FLOOR, None))
    np.testing.assert_allclose(z.numpy(), want, rtol=1e-6)
    sparse = tmp_path / "sparse.skops"                                     # a scipy sparse coef_: data, trusted
    skops.io.dump(LogisticRegression(max_iter=200).fit(X, Y).sparsify(), sparse)
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(sparse)))
    assert kind_of(cfg.teachers[1]).load(cfg, cfg.teachers[1]).num_parameters > 0


def test_a_pipeline_with_a_users_function_is_refused_until_listed(tmp_path, digits_dir):
    path = tmp_path / "shout.skops"
    skops.io.dump(Pipeline([("tfidf", TfidfVectorizer(preprocessor=shout)),
                            ("clf", LogisticRegression(max_iter=1000))]).fit(TEXTS, TEXT_Y), path)
    name = f"{shout.__module__}.shout"
    msg = refusal(tmp_path, digits_dir, path)
    assert "not trusted" in msg and name in msg and "teachers.1.trusted" in msg
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, checkpoint=str(path), trusted=[name]))
    assert kind_of(cfg.teachers[1]).load(cfg, cfg.teachers[1])(["x"]).shape == (1, 3)


def test_fit_reads_the_tasks_rows(tmp_path, digits_dir):
    """train asks the task for its labelled rows: for task text, texts, which a text pipeline takes."""
    path = tmp_path / "text.skops"
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, model=f"{__name__}:text_pipeline", fit={"seed": 3},
                                          checkpoint=str(path)), check=False)
    t, task = cfg.teachers[1], TextTask()
    assert kind_of(t).train(cfg, t, task) == 1.0
    assert task.asked == [("train", "teacher 'forest'")]
    module = kind_of(t).load(cfg, t)
    assert module.estimator.named_steps["clf"].random_state == 3
    assert module(["a great film", "so boring"]).argmax(-1).tolist() == [0, 2]


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


def test_sklearn_teaches_classification_and_text_only(tmp_path, digits_dir):
    cfg = sklearn_teacher(tmp_path, digits_dir, model="sklearn.ensemble:RandomForestClassifier", fit={})
    cfg.update(task="token")
    cfg["data"]["vocab_size"] = 64
    with pytest.raises(UserError, match="kind sklearn, which teaches task classification or text, not token"):
        ekd.load_config(cfg, check=False)


def test_default_artifact_is_a_skops_file(tmp_path, digits_dir):
    cfg = ekd.load_config(sklearn_teacher(tmp_path, digits_dir, model="sklearn.ensemble:RandomForestClassifier",
                                          fit={}), check=False)
    assert kind_of(cfg.teachers[1]).artifact(cfg, cfg.teachers[1]).endswith("teachers/forest.skops")
