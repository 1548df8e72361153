"""Born-again self-distillation (distill.strategy: born_again) through `ensemblekd run`, in process:
real Ray, two Ray Train workers running DeepSpeed, the shared labelled store copied under tmp_path,
MLflow in tmp_path. Two generations, as few epochs as can show it: the cost is two distills and
one label pass of gen1 on top of the shared fixture."""

import re
import shutil

import numpy as np
import pytest
import torch
import yaml

import ensemblekd as ekd

pytestmark = pytest.mark.integration


def test_two_generations_run_end_to_end(labelled, tmp_path, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from ensemblekd.cli import main
    from ensemblekd.testing import load_student, read_split
    from ensemblekd.store import Store

    cfg, _ = labelled
    raw = cfg.to_dict()
    shutil.copytree(cfg.store.uri, tmp_path / "store")        # gen1 is labelled into it: the fixture's stays as is
    out = tmp_path / "out"
    raw["store"]["uri"], raw["tracking"]["uri"] = str(tmp_path / "store"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["trainer"].update(epochs=2, output_dir=str(out))
    raw["distill"].update(strategy="born_again", generations=2, ensemble_blend=0.25)
    raw["evaluate"]["repeats"] = 0
    path = tmp_path / "born_again.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        code = main(["run", str(path), "--no-progress"])
    finally:
        mlflow.set_tracking_uri(None)
    stdout = capsys.readouterr().out
    assert code == 0, stdout[-3000:]

    gen1_file, student_file = out / "generations" / "gen1" / "student.pt", out / "student.pt"
    assert gen1_file.is_file() and student_file.is_file()
    assert re.search(rf"^gen1: {re.escape(str(gen1_file))}  val accuracy \d+\.\d+%$", stdout, re.M), stdout
    for row, role in (("ensemble", "ensemble"), ("gen1", "generation"), ("student", "student")):
        assert re.search(rf"^{row}\s+{role}\s+\d+\.\d+%", stdout, re.M), stdout

    store = Store.open(str(tmp_path / "store"))                # the store holds gen1's own test targets
    for split in ("train", "val", "test"):
        store.check_complete(split, ["mlp_a", "mlp_b", "gen1"])
    assert store.teacher("gen1")["val_accuracy"] > 0.3
    _, x, _ = read_split(cfg.data.test, cfg.data.features, None, cfg.data.id)
    with torch.no_grad():
        gen1 = load_student(cfg.student, str(gen1_file))(torch.from_numpy(x).float()).numpy()
    assert np.allclose(ekd.open_store(store.uri).targets("gen1", "test").logits, gen1, rtol=1e-2, atol=1e-2)
    assert not np.allclose(gen1, load_student(cfg.student, str(student_file))(torch.from_numpy(x).float())
                           .detach().numpy(), atol=1e-2)  # two trainings, two models

    client = MlflowClient(raw["tracking"]["uri"])
    parent_id = re.search(r"MLflow run: ([0-9a-f]{32})", stdout).group(1)
    parent = client.get_run(parent_id)
    children = {r.data.tags["ensemblekd.level"]: r for r in client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
    assert sorted(children) == ["gen1", "student"]
    assert children["gen1"].data.params["teachers"] == "mlp_a,mlp_b"
    assert children["student"].data.params["teachers"] == "mlp_a,mlp_b,gen1"
    assert {r.data.params["model"] for r in children.values()} == {cfg.student.model}
    assert all(len(client.get_metric_history(r.info.run_id, "val_accuracy")) == 2 for r in children.values())
    assert children["student"].data.metrics["teacher_weight.gen1"] == pytest.approx(0.75)
    assert children["student"].data.metrics["teacher_weight.mlp_a"] == pytest.approx(0.125)
    assert children["gen1"].data.metrics["teacher_weight.mlp_a"] == pytest.approx(0.5)

    report = yaml.safe_load((out / "report" / "report.json").read_text())
    rows = {r["model"]: r for r in report["rows"]}
    assert [r["role"] for r in report["rows"]] == ["teacher", "teacher", "ensemble", "generation", "student"]
    assert rows["gen1"]["params"] == rows["student"]["params"] and rows["gen1"]["accuracy"] > 0.3
    assert parent.data.metrics["test_accuracy.gen1"] == pytest.approx(rows["gen1"]["accuracy"])
