"""configs/digits_sklearn.yaml end to end, as a user runs it (shrunk with --set): scikit-learn
teachers fitted in Ray tasks and saved with skops beside a torch CNN, labelled, distilled into the
MLP student by Ray Train + DeepSpeed, evaluated, exported to the MLflow Model Registry and served by
`mlflow models serve` on 127.0.0.1."""

import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import requests
import torch
from conftest import REPO, served_model

import ensemblekd as ekd
from ensemblekd.testing import load_student, read_split

pytestmark = pytest.mark.integration
CONFIG = REPO / "configs" / "digits_sklearn.yaml"


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "ensemblekd", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def sklearn_run(tmp_path_factory, digits_dir):
    tmp = tmp_path_factory.mktemp("sklearn")
    sets = {"data.train": digits_dir / "train", "data.val": digits_dir / "val", "data.test": digits_dir / "test",
            "teachers.0.kwargs.max_iter": 20, "teachers.0.checkpoint": tmp / "t" / "hist_gbm.skops",
            "teachers.1.kwargs.n_estimators": 20, "teachers.1.checkpoint": tmp / "t" / "forest.skops",
            "teachers.2.fit.epochs": 5, "teachers.2.checkpoint": tmp / "t" / "small_cnn.pt",
            "store.uri": tmp / "store", "trainer.epochs": 8, "trainer.num_workers": 0, "trainer.output_dir": tmp / "out",
            "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "tracking.experiment": "sklearn"}
    args = [a for key, value in sets.items() for a in ("--set", f"{key}={value}")]
    proc = cli("run", CONFIG, "--no-progress", *args, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc, args


def test_the_table_shows_every_teacher_and_the_student(sklearn_run):
    _, proc, _ = sklearn_run
    acc = {m: float(a) for m, a in re.findall(r"^(\w+)\s+\w+\s+(\d+\.\d+)%", proc.stdout, re.M)}
    assert set(acc) == {"hist_gbm", "forest", "small_cnn", "ensemble", "student"}, proc.stdout
    assert acc["hist_gbm"] > 85 and acc["forest"] > 85 and acc["student"] > 80


def test_teachers_are_skops_files_recorded_as_kind_sklearn(sklearn_run):
    tmp, _, _ = sklearn_run
    for name in ("hist_gbm", "forest"):
        path = tmp / "t" / f"{name}.skops"
        assert zipfile.is_zipfile(path) and "schema.json" in zipfile.ZipFile(path).namelist()  # skops, not pickle
        assert json.loads((tmp / "t" / f"{name}.skops.fit.json").read_text())["val_accuracy"] > 0.8
    manifest = json.loads((tmp / "store" / "manifest.json").read_text())
    assert manifest["teachers"]["forest"]["spec"]["kind"] == "sklearn"
    assert manifest["teachers"]["hist_gbm"]["spec"]["model"] == "sklearn.ensemble:HistGradientBoostingClassifier"
    assert "kind" not in manifest["teachers"]["small_cnn"]["spec"]                   # kind torch, as before


def test_a_second_label_reuses_the_fitted_teachers_and_the_store(sklearn_run):
    tmp, _, args = sklearn_run
    before = (tmp / "t" / "forest.skops").stat().st_mtime_ns
    proc = cli("label", CONFIG, "--no-progress", *args, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labelled 0 shard(s)" in proc.stdout
    assert (tmp / "t" / "forest.skops").stat().st_mtime_ns == before


def test_exported_student_is_served(sklearn_run):
    tmp, proc, args = sklearn_run
    run_id = re.search(r"MLflow run: ([0-9a-f]{32})", proc.stdout).group(1)
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    exported = cli("export", run_id, "--name", "digits-sklearn-student", "--tracking-uri", tracking_uri, cwd=tmp)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "registered 'digits-sklearn-student' version 1" in exported.stdout
    cfg = ekd.load_config(CONFIG, [a for a in args if a != "--set"], check=False)
    _, x, _ = read_split(cfg.data.test, cfg.data.features, None, cfg.data.id)
    x = x[:20]
    with torch.no_grad():
        want = torch.softmax(load_student(cfg.student, str(tmp / "out" / "student.pt"))(torch.from_numpy(x)), -1).numpy()
    with served_model("models:/digits-sklearn-student/1", tracking_uri, tmp) as url:
        response = requests.post(f"{url}/invocations", json={"inputs": x.tolist()}, timeout=60)
    assert response.status_code == 200, response.text[:2000]
    np.testing.assert_allclose(np.array(response.json()["predictions"], np.float32), want, atol=1e-5)
