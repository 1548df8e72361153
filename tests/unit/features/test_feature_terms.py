"""Feature- and relation-based knowledge: the feature taps, the PCA, the student wrapper and the
hint and RKD terms against hand computations; scikit-learn MLP features; store projections."""

import math

import numpy as np
import pytest
import torch

from ensemblekd.errors import UserError
from ensemblekd.features import (Projected, StudentWithFeatures, WithFeatures, fit_pca, hint_loss, rkd_angle,
                                 rkd_distance, student_with_features)
from ensemblekd.models import mlp


def test_a_teacher_gives_its_named_modules_output_as_feature():
    torch.manual_seed(0)
    model = mlp(4, 3, hidden=[5, 6]).eval()          # 0 Linear, 1 ReLU, 2 Linear, 3 ReLU, 4 Linear
    x = torch.randn(7, 4)
    logits, feature = WithFeatures(model, "3", "teachers.0.feature")(x)
    assert torch.equal(logits, model(x))
    assert torch.allclose(feature, torch.relu(model[2](torch.relu(model[0](x)))))
    assert feature.shape == (7, 6)


def test_an_unknown_module_is_one_line_naming_the_modules():
    with pytest.raises(UserError, match=r"teachers\.0\.feature: 'fc9' is not a module of Sequential; its modules are "
                                        r"'0' \(Linear\), '1' \(ReLU\), '2' \(Linear\)$"):
        WithFeatures(mlp(4, 3, hidden=[5]), "fc9", "teachers.0.feature")


def test_pca_recovers_the_principal_directions_deterministically():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    x = (rng.normal(size=(2000, 6)) * [10, 5, 1, 0.1, 0.1, 0.1]) @ basis.T + 3.0
    mean, comps = fit_pca(x, 2)
    assert np.allclose(mean, x.mean(0), atol=1e-4)
    assert comps.shape == (6, 2)
    assert np.allclose(np.abs(comps.T @ basis[:, :2]), np.eye(2), atol=0.05)   # the two widest directions (sampling noise ~0.02)
    assert np.allclose(comps.T @ comps, np.eye(2), atol=1e-5)
    assert (comps[np.abs(comps).argmax(0), [0, 1]] > 0).all()                   # signed: largest entry positive
    again = fit_pca(x.copy(), 2)
    assert np.array_equal(again[1], comps)
    # the projection keeps the variance of those directions
    projected = Projected(_Pair(), mean, comps)
    _, f = projected(torch.from_numpy(x.astype(np.float32)))
    assert f.shape == (2000, 2) and abs(f[:, 0].std().item() - 10) < 0.5


class _Pair(torch.nn.Module):
    """A (logits, feature) model whose feature is its input."""

    def forward(self, x):
        return x[:, :1], x


def test_the_student_wrapper_returns_logits_and_keeps_feature_and_hints():
    torch.manual_seed(0)
    student = mlp(4, 3, hidden=[8])
    wrapped = student_with_features(student, "1", [5, 2], hint=True, example=torch.randn(2, 4))
    assert isinstance(wrapped, StudentWithFeatures)
    assert [p.in_features for p in wrapped.projections] == [8, 8] and [p.out_features for p in wrapped.projections] == [5, 2]
    x = torch.randn(3, 4)
    assert torch.equal(wrapped(x), student(x))
    assert wrapped.features.shape == (3, 8) and [h.shape for h in wrapped.hints] == [(3, 5), (3, 2)]
    assert [t.shape for t in wrapped.split(torch.zeros(3, 7))] == [(3, 5), (3, 2)]
    assert set(wrapped.student.state_dict()) == set(student.state_dict())   # what is saved as the student
    no_hint = student_with_features(mlp(4, 3, hidden=[8]), "1", [5, 2], hint=False, example=torch.randn(2, 4))
    assert len(no_hint.projections) == 0


def test_hint_loss_by_hand():
    hints = [torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[3.0], [1.0]])]
    feats = [torch.tensor([[0.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0], [1.0]])]
    w = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # teacher 0: rows (1 + 4) / 2 = 2.5 and (0 + 4) / 2 = 2; teacher 1: rows 4 and 0
    # mean_b w·mse: teacher 0 (0.5·2.5 + 1·2) / 2 = 1.625; teacher 1 (0.5·4 + 0) / 2 = 1
    assert hint_loss(hints, feats, w).item() == pytest.approx(2.625)


def test_rkd_distance_by_hand_and_its_invariances():
    t = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])        # distances 3, 4, 5: mean 4
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])        # distances 1, 1, √2: mean (2 + √2) / 3
    m = (2 + math.sqrt(2)) / 3
    pairs = [(3 / 4, 1 / m), (4 / 4, 1 / m), (5 / 4, math.sqrt(2) / m)]

    def huber(a, b):
        d = abs(a - b)
        return 0.5 * d * d if d < 1 else d - 0.5
    expected = 2 * sum(huber(a, b) for a, b in pairs) / 9        # each pair twice, 9 entries with the diagonal
    assert rkd_distance(s, t).item() == pytest.approx(expected, rel=1e-5)
    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    assert rkd_distance(7 * t @ rotation + 2, t).item() == pytest.approx(0.0, abs=1e-6)   # scale, rotation, shift


def test_rkd_angle_sees_shape_not_size_and_has_gradients_on_duplicates():
    t = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    assert rkd_angle(0.1 * t + 5, t).item() == pytest.approx(0.0, abs=1e-6)
    squashed = t * torch.tensor([1.0, 0.1])
    assert rkd_angle(squashed, t).item() > 0.01
    s = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0]], requires_grad=True)   # two equal rows
    (rkd_angle(s, t[:3]) + rkd_distance(s, t[:3])).backward()
    assert torch.isfinite(s.grad).all()


def test_a_scikit_learn_mlps_last_hidden_layer_explains_its_probabilities():
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ensemblekd.teachers.scikit_learn import EstimatorModule, last_hidden

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 5)).astype(np.float32), rng.integers(0, 3, 120)
    for est in (MLPClassifier(hidden_layer_sizes=(7, 4), max_iter=50, random_state=0),
                make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(6,), activation="tanh",
                                                              max_iter=50, random_state=0))):
        with pytest.warns(Warning):  # not converged in 50 iterations: fine for this test
            est.fit(x, y)
        h = last_hidden(est, x)
        final = est[-1] if hasattr(est, "steps") else est
        logits = h @ final.coefs_[-1] + final.intercepts_[-1]
        expected = torch.softmax(torch.from_numpy(logits), -1).numpy()
        assert np.allclose(expected, est.predict_proba(x), atol=1e-5)
        assert EstimatorModule(est)(torch.from_numpy(x)).shape == (120, 3)


def test_a_scikit_learn_teacher_without_hidden_layer_refuses_features(tmp_path):
    from sklearn.linear_model import LogisticRegression

    from ensemblekd.config import Config
    from ensemblekd.teachers.scikit_learn import EstimatorModule, SklearnKind

    cfg = Config.model_validate({
        "data": {"train": "a", "val": "b", "test": "c"}, "store": {"uri": str(tmp_path)},
        "student": {"model": "ensemblekd.models:mlp"},
        "teachers": [{"name": "lr", "kind": "sklearn", "checkpoint": "x.skops", "feature": "last_hidden"}]})
    est = LogisticRegression(max_iter=10).fit(np.eye(3), [0, 1, 2])
    with pytest.raises(UserError, match=r"^teachers\.0\.feature: LogisticRegression has no hidden layer to take "
                                        r"features from .*; remove feature$"):
        SklearnKind().with_features(cfg, cfg.teachers[0], EstimatorModule(est))


def test_store_keeps_a_projection_with_its_checksum(tmp_path):
    from ensemblekd.store import Store

    store = Store.open(str(tmp_path / "store"), create=True)
    store.set_teacher("a", "fp", {})
    store.set_teacher("b", "fp", {})
    mean, comps = np.arange(3, dtype=np.float32), np.ones((3, 2), np.float32)
    store.set_projection("a", (mean, comps))
    store.set_projection("b", None)
    store.save()
    again = Store.open(str(tmp_path / "store"))
    got = again.projection("a")
    assert np.array_equal(got[0], mean) and np.array_equal(got[1], comps)
    assert again.projection("b") is None
    path = tmp_path / "store" / "projection" / "a.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        again.projection("a")
    with pytest.raises(UserError, match=r"teachers \['a', 'b'\] store no features; set their feature"):
        again.feature_dims(["a", "b"])


def test_classification_shards_carry_float16_features():
    from ensemblekd.store import unpack
    from ensemblekd.tasks.classification import decode, encode

    ids, logits = np.arange(4), np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    feats = np.linspace(-2, 2, 20, dtype=np.float32).reshape(4, 5)
    data, entry = encode(ids, logits, "float32", feats)
    got = decode(unpack(data))
    assert got.features.dtype == np.float16 and np.allclose(got.features, feats, atol=1e-3)
    assert np.array_equal(got.logits, logits)
    assert decode(unpack(encode(ids, logits, "float32")[0])).features is None


def test_what_a_teacher_stores_of_its_feature_is_part_of_its_identity(tmp_path):
    from ensemblekd.config import Config
    from ensemblekd.models import save_state
    from ensemblekd.stages.label import identity

    save_state(mlp(4, 3, hidden=[5]), str(tmp_path / "t.pt"))

    def config(feature, dim):
        return Config.model_validate({
            "data": {"train": "a", "val": "b", "test": "c"}, "store": {"uri": str(tmp_path), "feature_dim": dim},
            "student": {"model": "ensemblekd.models:mlp"},
            "teachers": [{"name": "t", "model": "ensemblekd.models:mlp", "checkpoint": str(tmp_path / "t.pt"),
                          "feature": feature}, {"name": "u", "model": "ensemblekd.models:mlp",
                                                "checkpoint": str(tmp_path / "t.pt"), "feature": "1"}]})

    plain = config(None, None)
    prints = {identity(config(f, d), config(f, d).teachers[0])[0] for f, d in ((None, 8), ("1", None), ("1", 8),
                                                                                ("1", 4), ("0", 8))}
    assert len(prints) == 5
    assert identity(plain, plain.teachers[0])[0] == identity(config(None, 8), config(None, 8).teachers[0])[0]
    assert identity(config("1", 8), config("1", 8).teachers[0])[1]["feature_dim"] == 8
