"""Strategies against a labelled store (local Ray, Ray Train + DeepSpeed, MLflow): real runs that must
equal parallel where the papers say they reduce to it, a whole TAKD chain, and the evaluation
ensemble of a staged strategy."""

import shutil

import pytest
import torch


def _one_teacher(cfg, tmp_path, name, **distill):
    out = cfg.model_copy(deep=True)
    out.teachers = [t for t in out.teachers if t.name == "mlp_a"]
    out.trainer.epochs, out.trainer.output_dir = 2, str(tmp_path / name)
    for key, value in distill.items():
        setattr(out.distill, key, value)
    return out


def test_one_stage_sequential_and_zero_assistants_equal_parallel(labelled, tmp_path):
    from ensemblekd.stages.chain import distill_chain

    cfg, _ = labelled
    states = {}
    for strategy in ("parallel", "sequential", "assistant"):
        result = distill_chain(_one_teacher(cfg, tmp_path, strategy, strategy=strategy), None)
        states[strategy] = torch.load(result["student"], weights_only=True)
    for strategy in ("sequential", "assistant"):
        for key, value in states["parallel"].items():
            assert torch.equal(value, states[strategy][key]), (strategy, key)


def test_takd_chain_labels_its_assistant_and_nests_mlflow_runs(labelled, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from ensemblekd import tracking
    from ensemblekd.config import AssistantConfig
    from ensemblekd.stages.chain import distill_chain
    from ensemblekd.stages.evaluate import evaluate
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
        result = distill_chain(cfg, info, progress=False)
    assert [c["name"] for c in result["chain"]] == ["ta", "student"]
    store = Store.open(cfg.store.uri)
    for split in ("train", "val", "test"):
        store.check_complete(split, ["ta"])                         # labelled like a teacher
    assert store.teacher("ta")["val_accuracy"] > 0.3
    rows = evaluate(cfg, result["student"])["rows"]                # the assistant "ta" from cfg.distill.assistants
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
    from ensemblekd.mixing import build_strategy
    from ensemblekd.store import Store

    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    cfg.distill.strategy = "sequential"
    z = torch.randn(4, 2, 10)
    names = [t.name for t in cfg.teachers]
    store = Store.open(cfg.store.uri)
    strategy = build_strategy(cfg.distill, names, store.val_accuracy(names), cfg.trainer.epochs, ensemble=True)
    p, w = strategy.targets(z, None, 1.0)
    assert torch.allclose(w, torch.full((4, 2), 0.5))   # both teachers, not stage 0's one
