"""The extension recipe of docs/architecture.md, followed from outside the package: a toy task,
teacher kind, strategy and divergence (tests/toy_extensions.py) configured as 'module:callable'
run the whole pipeline (fit, label, distill, evaluate) with no edit inside ensemblekd/."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import ensemblekd as ekd
from ensemblekd.testing import tiny_config

pytestmark = pytest.mark.integration


def test_a_toy_task_kind_strategy_and_loss_run_end_to_end(tmp_path, digits_dir, ray_local):
    import toy_extensions as toy

    raw = tiny_config(tmp_path, digits_dir, task=toy.TASK, trainer={"epochs": 3},
                      distill={"strategy": "toy_extensions:FirstTeacherOnly", "loss": "toy_extensions:half_squared_distance"})
    for t in raw["teachers"]:
        t["kind"] = "toy_extensions:ToyKind"
    toy.CALLS.clear()

    result = ekd.run(raw, progress=False)

    manifest = json.loads((Path(raw["store"]["uri"]) / "manifest.json").read_text())
    assert manifest["task"] == toy.TASK and manifest["toy_task"] == "made by ToyTask"
    assert all(t["spec"]["toy_kind"] for t in manifest["teachers"].values())
    assert toy.CALLS["strategy"] > 0 and toy.CALLS["loss"] > 0  # the student learnt through both
    metrics = result.distill.metrics
    assert metrics["teacher_weight.mlp_a"] == 1.0 and metrics["teacher_weight.mlp_b"] == 0.0
    assert metrics["val_accuracy"] > 0.3                          # 10 classes, chance is 0.1
    student = result.evaluation.row("student")
    assert student.accuracy > 0.3
    assert student.metrics == {"error": pytest.approx(1 - student.accuracy)}  # the task's own column
    assert result.table.splitlines()[0].split()[-3:] == ["error", "params", "size"]
    run = MlflowClient(result.tracking_uri).get_run(result.run_id).data
    assert run.metrics["test_error.student"] == pytest.approx(1 - student.accuracy)
    assert run.params["task"] == toy.TASK and run.params["distill.loss"] == "toy_extensions:half_squared_distance"
