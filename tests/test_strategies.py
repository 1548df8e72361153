"""Sequential and teacher-assistant strategies: pure behaviour, then real runs that must equal
parallel where the papers say they reduce to it, and a whole TAKD chain."""

import shutil

import pytest
import torch

from ensemblekd.weighting import Assistant, Parallel, Sequential, stage_epochs, teacher_order

NAMES = ["a", "b", "c"]
ACC = {"a": 0.9, "b": 0.7, "c": 0.8}


def test_stage_epochs_split_evenly_or_as_given():
    assert stage_epochs(3, 7) == [2, 2, 3]
    assert stage_epochs(2, 4, [1, 3]) == [1, 3]


def test_orders():
    assert teacher_order(NAMES, "config", None) == [0, 1, 2]
    assert teacher_order(NAMES, "ascending_accuracy", ACC) == [1, 2, 0]
    assert teacher_order(NAMES, "descending_accuracy", ACC) == [0, 2, 1]


def test_sequential_uses_one_teacher_per_stage():
    seq = Sequential(NAMES, order="ascending_accuracy", epochs=7, val_accuracy=ACC)
    z = torch.randn(4, 3, 5)
    expected_teacher = [1, 1, 2, 2, 0, 0, 0]
    for epoch, k in enumerate(expected_teacher):
        p, w = seq.targets(z, None, 2.0, epoch)
        assert torch.equal(w, torch.nn.functional.one_hot(torch.full((4,), k), 3).float())
        assert torch.allclose(p, torch.softmax(z[:, k] / 2.0, -1))
    assert seq.describe() == "b (2 ep) -> c (2 ep) -> a (3 ep)"


def test_sequential_cumulative_grows_the_set_and_applies_the_rule_within_it():
    seq = Sequential(NAMES, weighting="static", weights={"a": 1, "b": 1, "c": 2}, cumulative=True, epochs=3)
    z = torch.randn(2, 3, 4)
    assert torch.allclose(seq.targets(z, None, 1.0, 0)[1][0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(seq.targets(z, None, 1.0, 1)[1][0], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(seq.targets(z, None, 1.0, 2)[1][0], torch.tensor([0.25, 0.25, 0.5]))


def test_assistant_blends_the_ensemble_and_reduces_to_parallel_without_one():
    z = torch.randn(3, 3, 4)
    blended = Assistant(NAMES, assistant_names=["c"], ensemble_blend=0.25)
    _, w = blended.targets(z, None, 2.0)
    assert torch.allclose(w[0], torch.tensor([0.125, 0.125, 0.75]))
    only_assistant = Assistant(NAMES, assistant_names=["c"], ensemble_blend=0.0)
    assert torch.allclose(only_assistant.targets(z, None, 2.0)[0], torch.softmax(z[:, 2] / 2.0, -1))
    first_level = Assistant(NAMES, weighting="entropy", assistant_names=["x"], ensemble_blend=0.5)
    parallel = Parallel(NAMES, weighting="entropy")
    assert torch.allclose(first_level.targets(z, None, 2.0)[0], parallel.targets(z, None, 2.0)[0])


# -- real runs -----------------------------------------------------------------------------
def _one_teacher(cfg, tmp_path, name, **distill):
    out = cfg.model_copy(deep=True)
    out.teachers = [t for t in out.teachers if t.name == "mlp_a"]
    out.trainer.epochs, out.trainer.output_dir = 2, str(tmp_path / name)
    for key, value in distill.items():
        setattr(out.distill, key, value)
    return out


def test_one_stage_sequential_and_zero_assistants_equal_parallel(labelled, tmp_path):
    from ensemblekd.pipeline import distill_stage

    cfg, _ = labelled
    states = {}
    for strategy in ("parallel", "sequential", "assistant"):
        result = distill_stage(_one_teacher(cfg, tmp_path, strategy, strategy=strategy), None)
        states[strategy] = torch.load(result["student"], weights_only=True)
    for strategy in ("sequential", "assistant"):
        for key, value in states["parallel"].items():
            assert torch.equal(value, states[strategy][key]), (strategy, key)


def test_takd_chain_labels_its_assistant_and_nests_mlflow_runs(labelled, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from ensemblekd import tracking
    from ensemblekd.config import AssistantConfig
    from ensemblekd.evaluate import evaluate
    from ensemblekd.pipeline import distill_stage
    from ensemblekd.store import Store

    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    shutil.copytree(cfg.store.uri, tmp_path / "store")
    cfg.store.uri, cfg.trainer.output_dir = str(tmp_path / "store"), str(tmp_path / "out")
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.trainer.epochs = 2
    cfg.distill.strategy = "assistant"
    cfg.distill.ensemble_blend = 0.5
    cfg.distill.assistants = [AssistantConfig(name="ta", model="ensemblekd.models:mlp",
                                              kwargs={"in_features": 64, "num_classes": 10, "hidden": [48]})]
    with tracking.mlflow_run(cfg, "test") as info:
        result = distill_stage(cfg, info, progress=False)
    assert [c["name"] for c in result["chain"]] == ["ta", "student"]
    store = Store.open(cfg.store.uri)
    for split in ("train", "val", "test"):
        store.check_complete(split, ["ta"])                         # labelled like a teacher
    assert store.teacher("ta")["val_accuracy"] > 0.3
    rows = evaluate(cfg, result["student"], assistants=["ta"])["rows"]
    assert [r["role"] for r in rows] == ["teacher", "teacher", "ensemble", "assistant", "student"]
    assert rows[3]["params"] == 64 * 48 + 48 + 48 * 10 + 10
    children = MlflowClient(cfg.tracking.uri).search_runs(
        [info["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{info['run_id']}'")
    assert sorted(r.data.tags["ensemblekd.level"] for r in children) == ["student", "ta"]
    assert all("val_accuracy" in r.data.metrics for r in children)
    student_run = next(r for r in children if r.data.tags["ensemblekd.level"] == "student")
    assert student_run.data.params["teachers"] == "mlp_a,mlp_b,ta"
    assert student_run.data.metrics["teacher_weight.ta"] == pytest.approx(0.5)
    mlflow.set_tracking_uri(None)


def test_evaluation_ensemble_is_every_teacher_even_for_sequential(labelled):
    from ensemblekd.distill import strategy_for
    from ensemblekd.store import Store

    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    cfg.distill.strategy = "sequential"
    z = torch.randn(4, 2, 10)
    p, w = strategy_for(cfg, Store.open(cfg.store.uri), ensemble=True).targets(z, None, 1.0)
    assert torch.allclose(w, torch.full((4, 2), 0.5))   # both teachers, not stage 0's one
