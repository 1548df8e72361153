"""The whole pipeline through the CLI, in a subprocess, as a user runs it: real Ray, two Ray Train
workers each running DeepSpeed, a store under tmp_path, MLflow in tmp_path."""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO
from ensemblekd.testing import tiny_config, write_config

pytestmark = pytest.mark.integration


def cli(*args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "ensemblekd", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, digits_dir):
    tmp = tmp_path_factory.mktemp("pipeline")
    config = write_config(tmp, tiny_config(tmp, digits_dir, trainer={"num_workers": 2}))  # the real Ray Train job
    proc = cli("run", config, "--no-progress", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, config, proc


def test_run_prints_the_table_and_the_run_id(pipeline_run):
    _, _, proc = pipeline_run
    for row in ("mlp_a", "mlp_b", "ensemble", "student"):
        assert re.search(rf"^{row}\s+\w+\s+\d+\.\d+%", proc.stdout, re.M), proc.stdout
    assert re.search(r"MLflow run: [0-9a-f]{32}", proc.stdout)


def test_store_manifest_and_checksums(pipeline_run):
    tmp, _, _ = pipeline_run
    manifest = json.loads((tmp / "store" / "manifest.json").read_text())
    assert set(manifest["teachers"]) == {"mlp_a", "mlp_b"} and manifest["num_classes"] == 10
    for split in ("train", "val", "test"):
        n = len(manifest["inputs"][split])
        for teacher in ("mlp_a", "mlp_b"):
            assert len(manifest["shards"][split][teacher]) == n
    inspect = cli("inspect", tmp / "store", cwd=tmp)
    assert inspect.returncode == 0
    total = sum(len(v) for s in manifest["shards"].values() for v in s.values())
    assert f"checksums: {total}/{total} verified" in inspect.stdout


def test_mlflow_run_has_params_metrics_and_the_model(pipeline_run):
    from mlflow.tracking import MlflowClient

    tmp, _, proc = pipeline_run
    run_id = re.search(r"MLflow run: ([0-9a-f]{32})", proc.stdout).group(1)
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    p, m = run.data.params, run.data.metrics
    assert p["trainer.epochs"] == "8" and p["distill.temperature"] == "4.0" and p["teachers.mlp_a.model"]
    assert m["test_accuracy.student"] > 0.85               # the floor for 8 tiny epochs
    assert m["test_accuracy.ensemble"] > 0.9 and 0.0 < m["student_fidelity"] <= 1.0
    assert len(client.get_metric_history(run_id, "val_accuracy")) == 8        # one per epoch
    steps = client.get_metric_history(run_id, "loss")
    assert len(steps) >= 8 * 8 and {s.key for s in steps} == {"loss"}         # per step
    for key in ("ce_loss", "kd_loss", "lr", "samples_per_s", "teacher_val_accuracy.mlp_a"):
        assert key in m
    assert m["teacher_weight.mlp_a"] == pytest.approx(0.5) and m["teacher_weight.mlp_b"] == pytest.approx(0.5)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for d in ("store", "report") for a in client.list_artifacts(run_id, d)}
    assert {"config.yaml", "student.pt", "store/manifest.json", "report/report.json"} <= artifacts
    models = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [mdl.name for mdl in models] == ["student"]


def test_label_again_does_no_teacher_work(pipeline_run):
    tmp, config, _ = pipeline_run
    proc = cli("label", config, "--no-progress", cwd=tmp)
    assert proc.returncode == 0 and "labelled 0 shard(s)" in proc.stdout


def test_evaluate_reports_on_the_saved_student(pipeline_run):
    tmp, config, _ = pipeline_run
    proc = cli("evaluate", config, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^student\s+student\s+\d+\.\d+%", proc.stdout, re.M)


@pytest.mark.parametrize("args,fragment", [
    (["validate", "CONFIG", "--set", "trainer.epochz=1"], "trainer.epochz: unknown key"),
    (["validate", "CONFIG", "--set", "student.model=nowhere:fn"], "student.model: cannot import module 'nowhere'"),
    (["validate", "missing.yaml"], "config file 'missing.yaml' not found"),
    (["inspect", "no/such/store"], "no soft-target store"),
    (["prepare", "mnist", "out"], "unknown data set 'mnist'"),
    (["distill", "CONFIG", "--set", "store.uri=/nonexistent/store"], "no soft-target store"),
])
def test_bad_input_is_one_line_on_stderr(pipeline_run, args, fragment):
    tmp, config, _ = pipeline_run
    proc = cli(*[config if a == "CONFIG" else a for a in args], cwd=tmp, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ensemblekd: error:") and fragment in lines[0], proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("--debug", "inspect", tmp_path / "none", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_demo_config_validates_through_the_cli(tmp_path):
    proc = cli("validate", REPO / "configs" / "digits.yaml", cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "ok (3 teachers" in proc.stdout


def test_inspect_names_a_corrupt_shard(pipeline_run, tmp_path):
    import shutil

    tmp, _, _ = pipeline_run
    store = tmp_path / "store"
    shutil.copytree(tmp / "store", store)
    shard = store / "train" / "mlp_a" / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])                       # truncated
    proc = cli("inspect", store, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "CORRUPT train/mlp_a/shard 2:" in proc.stdout and ", 1 bad" in proc.stdout
