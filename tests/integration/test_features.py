"""Features end to end: teachers' penultimate features labelled into the store next to their logits
(a torch MLP reduced by the PCA of store.feature_dim, a scikit-learn MLP stored whole), then a
student trained by Ray Train + DeepSpeed with the hint and both RKD terms, logged per epoch."""

import json

import numpy as np
import pytest
import torch

import ensemblekd as ekd
from ensemblekd import UserError
from ensemblekd.store import Store
from ensemblekd.tasks.classification import decode
from ensemblekd.testing import load_state, load_student, mlp, read_split, tiny_config, write_config

pytestmark = pytest.mark.integration

FEATURE_DIM = 16


def featured_config(tmp_path, digits_dir, **sections):
    cfg = tiny_config(tmp_path, digits_dir, store={"feature_dim": FEATURE_DIM}, student={"feature": "1"},
                      distill={"hint_weight": 0.5, "rkd_distance_weight": 1.0, "rkd_angle_weight": 2.0},
                      trainer={"epochs": 3}, **sections)
    cfg["teachers"][0]["feature"] = "1"          # mlp_a: Linear(64, 128), ReLU -> 128 wide, reduced to 16
    cfg["teachers"][1]["feature"] = "3"          # mlp_b: the second ReLU, 64 wide, reduced to 16
    cfg["teachers"].append({"name": "sk_mlp", "kind": "sklearn", "model": "sklearn.neural_network:MLPClassifier",
                            "kwargs": {"hidden_layer_sizes": [12], "max_iter": 300}, "fit": {"seed": 0},
                            "checkpoint": str(tmp_path / "teachers" / "sk_mlp.skops"), "feature": "last_hidden"})
    return cfg


@pytest.fixture(scope="module")
def featured(tmp_path_factory, digits_dir, labelled):
    """The session's fitted torch teachers (no refit), with features, and a scikit-learn MLP."""
    tmp = tmp_path_factory.mktemp("features")
    raw = featured_config(tmp, digits_dir)
    for t, fitted in zip(raw["teachers"], labelled[0].teachers):
        t.update(checkpoint=fitted.checkpoint, fit=None)
    cfg = ekd.load_config(write_config(tmp, raw))
    first = ekd.label(cfg, progress=False)
    return tmp, cfg, first


def test_features_are_stored_reduced_by_the_train_splits_pca(featured):
    tmp, cfg, first = featured
    store = Store.open(cfg.store.uri)
    teachers = store.manifest["teachers"]
    assert teachers["mlp_a"]["projection"]["shapes"]["components"] == [128, FEATURE_DIM]
    assert teachers["mlp_b"]["projection"]["shapes"]["components"][0] == 64
    assert teachers["sk_mlp"]["projection"] is None               # 12 wide: no wider than feature_dim, kept whole
    assert store.feature_dims(["mlp_a", "mlp_b", "sk_mlp"]) == [FEATURE_DIM, FEATURE_DIM, 12]
    assert teachers["mlp_a"]["spec"]["feature"] == "1" and teachers["mlp_a"]["spec"]["feature_dim"] == FEATURE_DIM

    # the stored test features are the teacher's module output, projected by the stored PCA
    ids, x, _ = read_split(cfg.data.test, "x", None, "id")
    stored = np.concatenate([decode(store.read_table("test", "mlp_a", i)).features
                             for i in range(len(store.inputs("test")))])
    teacher = load_state(mlp(64, 10, hidden=[128]), cfg.teachers[0].checkpoint, "mlp_a")
    with torch.no_grad():
        hidden = torch.relu(teacher[0](torch.from_numpy(x))).numpy()
    mean, comps = store.projection("mlp_a")
    assert stored.dtype == np.float16 and stored.shape == (len(ids), FEATURE_DIM)
    assert np.allclose(stored, (hidden - mean) @ comps, atol=0.02, rtol=0.01)
    # PCA components are ordered by the variance they keep
    var = stored.astype(np.float64).var(0)
    assert var[0] > var[1] > var[FEATURE_DIM - 1] > 0


def test_a_second_label_run_keeps_every_shard_and_the_projection(featured):
    tmp, cfg, _ = featured
    projection = (tmp / "store" / "projection" / "mlp_a.npz").read_bytes()
    again = ekd.label(cfg, progress=False)
    assert again.shards == 0
    assert (tmp / "store" / "projection" / "mlp_a.npz").read_bytes() == projection


def test_the_student_learns_from_hint_and_relations(featured):
    tmp, cfg, _ = featured
    result = ekd.distill(cfg, progress=False)
    m = result.metrics
    for term in ("train_hint", "train_rkd_distance", "train_rkd_angle"):
        assert np.isfinite(m[term]) and m[term] > 0, m
    assert m["val_accuracy"] > 0.5
    # the checkpoint is the student alone: it loads into the bare student model
    student = load_student(cfg.student, result.student)
    assert sum(p.numel() for p in student.parameters()) == 64 * 32 + 32 + 32 * 10 + 10
    import mlflow

    client = mlflow.MlflowClient(result.tracking_uri)
    history = [h.value for h in client.get_metric_history(result.run_id, "train_hint")]
    assert len(history) == 3 and history[-1] < history[0]           # per epoch, and it is learnt


def test_a_feature_module_that_does_not_exist_stops_label_before_any_shard(tmp_path, digits_dir, featured):
    _, done, _ = featured
    raw = featured_config(tmp_path, digits_dir)
    raw["teachers"] = [dict(t, checkpoint=done.teachers[i].checkpoint, fit=None) for i, t in enumerate(raw["teachers"][:2])]
    raw["teachers"][0]["feature"] = "9"
    cfg = ekd.load_config(write_config(tmp_path, raw))
    with pytest.raises(UserError, match=r"^teachers\.0\.feature: '9' is not a module of Sequential; its modules are "):
        ekd.label(cfg, progress=False)
    manifest = tmp_path / "store" / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["shards"] == {}
    assert not list((tmp_path / "store").rglob("*.parquet"))
