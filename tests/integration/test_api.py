"""The public Python API as a notebook uses it: configs as mappings with overrides, typed results,
and read access to the store as numpy and Arrow, on real Ray, DeepSpeed and MLflow."""

import mlflow
import numpy as np
import pytest

import ensemblekd as ekd
from ensemblekd.testing import read_split

pytestmark = pytest.mark.integration


def test_only_the_api_is_exported():
    assert set(ekd.__all__) == {"Config", "DistillResult", "Evaluation", "LabelResult", "ModelRow", "Options", "RunResult",
                                "Store", "Strategy", "UserError", "distill", "evaluate", "export", "label",
                                "load_config", "open_store", "run"}


def test_a_mapping_config_with_overrides_is_not_changed(labelled):
    raw = labelled[0].to_dict()
    cfg = ekd.load_config(raw, overrides=["trainer.epochs=3", "distill.temperature=2"])
    assert (cfg.trainer.epochs, cfg.distill.temperature) == (3, 2.0)
    assert raw["trainer"]["epochs"] == labelled[0].trainer.epochs         # the caller's mapping is untouched
    assert ekd.load_config(cfg).trainer.epochs == 3                        # a Config goes through as well
    with pytest.raises(ekd.UserError, match="trainer.epochz: unknown key"):
        ekd.load_config(raw, overrides=["trainer.epochz=3"])


def test_label_again_is_typed_and_finds_a_complete_store(labelled):
    cfg, first = labelled
    assert isinstance(first, ekd.LabelResult) and first.shards > 0 and first.rows > 0
    again = ekd.label(cfg, progress=False)
    assert (again.shards, again.rows, again.fitted) == (0, 0, [])


def test_the_store_reads_as_numpy_and_arrow(labelled):
    cfg, _ = labelled
    store = ekd.open_store(cfg.store.uri)
    assert store.teachers == ["mlp_a", "mlp_b"] and store.splits == ["test", "train", "val"]
    ids, _, _ = read_split(cfg.data.test, cfg.data.features, None, cfg.data.id)
    targets = store.targets("mlp_a", "test")                  # decoded by the store's task: ids, logits, features
    table = store.table("mlp_a", "test")
    assert targets.logits.shape == (len(ids), 10) and targets.logits.dtype == np.dtype(cfg.store.dtype)
    assert np.array_equal(targets.ids, ids) and targets.features is None
    assert store.unit == "row" and store.describe() == f"10 classes, {cfg.store.dtype}"
    assert table.column_names == ["id", "logits"] and np.array_equal(table["id"].to_numpy(), ids)
    assert all(ok for *_, ok, _ in store.verify())
    with pytest.raises(ekd.UserError, match="teacher 'nobody' is not in the store"):
        store.targets("nobody", "test")
    assert not any(hasattr(store, name) for name in ("commit", "save", "set_teacher", "forget_corrupt"))  # read-only
    store.manifest["teachers"].clear()
    assert store.teachers == ["mlp_a", "mlp_b"]  # its manifest is a copy


def test_distill_then_evaluate_return_typed_results(labelled, tmp_path):
    raw = labelled[0].to_dict()
    raw["trainer"].update(epochs=1, output_dir=str(tmp_path / "out"))
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    distilled = ekd.distill(raw, progress=False)
    assert isinstance(distilled, ekd.DistillResult) and distilled.run_id and distilled.chain == []
    assert distilled.student == str(tmp_path / "out" / "student.pt") and 0 <= distilled.metrics["val_accuracy"] <= 1
    evaluation = ekd.evaluate(raw, student=distilled.student, repeats=0)
    assert isinstance(evaluation, ekd.Evaluation) and evaluation.run_id
    assert [r.model for r in evaluation.rows] == ["mlp_a", "mlp_b", "ensemble", "student"]
    student = evaluation.row("student")
    assert isinstance(student, ekd.ModelRow) and student.params == 64 * 32 + 32 + 32 * 10 + 10
    assert student.metrics == {}                                         # classification adds nothing to the common fields
    assert student.p50_ms_b1 is None                                     # repeats=0: no latency
    assert "student" in evaluation.table and evaluation.markdown.startswith("| model")

    sweep = ekd.distill(raw, overrides=["tracking.log_model=false"], progress=False)   # metrics only, no served model
    client = mlflow.MlflowClient(distilled.tracking_uri)
    experiment = client.get_run(distilled.run_id).info.experiment_id

    def logged_models(run_id: str) -> list:
        return client.search_logged_models(experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'")

    assert len(logged_models(distilled.run_id)) == 1 and logged_models(sweep.run_id) == []
    assert "val_accuracy" in client.get_run(sweep.run_id).data.metrics
    with pytest.raises(ekd.UserError, match="has no student model; .* tracking.log_model true"):
        ekd.export(run_id=sweep.run_id, tracking_uri=sweep.tracking_uri)
