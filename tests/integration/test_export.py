"""`ensemblekd export` and serving: a real run's student is registered with its signature, input
example and TorchScript copy, served by `mlflow models serve` (local environment) on 127.0.0.1, and
answers real HTTP requests with exactly the probabilities the student gives in-process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from conftest import free_port, served_model

from ensemblekd import tracking
from ensemblekd.cli import main
from ensemblekd.stages import export
from ensemblekd.testing import build_module, load_state, read_split, write_config
from ensemblekd.tasks.base import TORCHSCRIPT_FILE

pytestmark = pytest.mark.integration
NAME = "digits-student"


@pytest.fixture(scope="module")
def student_run(labelled, tmp_path_factory):
    """A 2-epoch distill run whose student is logged, as `ensemblekd distill` does, to a fresh MLflow."""
    from mlflow.tracking import MlflowClient

    from ensemblekd.stages.distill import distill

    tmp = tmp_path_factory.mktemp("export")
    cfg = labelled[0].model_copy(deep=True)
    cfg.trainer.epochs = 2
    cfg.trainer.output_dir = str(tmp / "out")
    cfg.tracking.uri = f"sqlite:///{tmp / 'mlflow.db'}"
    MlflowClient(cfg.tracking.uri).create_experiment(cfg.tracking.experiment, artifact_location=str(tmp / "artifacts"))
    with tracking.mlflow_run(cfg, "distill") as info:
        result = distill(cfg, info, progress=False)
        export.log_student(cfg, result.student)
    return cfg, result.student, info["run_id"], tmp


@pytest.fixture(scope="module")
def exported(student_run):
    """`ensemblekd export RUN_ID --name digits-student`, as a user runs it."""
    cfg, _, run_id, tmp = student_run
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri}
    proc = subprocess.run([sys.executable, "-m", "ensemblekd", "export", run_id, "--name", NAME], check=False,
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def test_rows(student_run):
    """A real batch of test rows and the student's own probabilities for them, computed in-process."""
    cfg, student_uri, _, _ = student_run
    _, x, _ = read_split(cfg.data.test, cfg.data.features, None, cfg.data.id)
    x = x[:50]
    student = load_state(build_module(cfg.student.model, cfg.student.kwargs), student_uri, "student")
    with torch.no_grad():
        return x, torch.softmax(student(torch.from_numpy(x)), dim=-1).numpy()


def test_export_registers_the_student_with_signature_and_example(student_run, exported):
    import mlflow
    from mlflow.tracking import MlflowClient

    cfg, _, run_id, _ = student_run
    assert f"registered '{NAME}' version 1" in exported.stdout
    assert f"mlflow models serve -m models:/{NAME}/1 --env-manager local" in exported.stdout
    version = MlflowClient(cfg.tracking.uri).get_model_version(NAME, "1")
    assert version.run_id == run_id and version.status == "READY"
    mlflow.set_tracking_uri(cfg.tracking.uri)
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    inputs, outputs = info.signature.inputs.to_dict(), info.signature.outputs.to_dict()
    assert inputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 64)}}]
    assert outputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, 10)}}]
    assert info.saved_input_example_info["type"] == "ndarray"
    example = mlflow.models.Model.load(f"models:/{NAME}/1").load_input_example()
    assert example.shape == (4, 64) and example.dtype == np.float32
    assert {"python_function", "pytorch"} <= set(info.flavors)


@pytest.fixture
def server(student_run, exported, tmp_path):
    """`mlflow models serve` in its own session; afterwards its whole process group is gone."""
    with served_model(f"models:/{NAME}/1", student_run[0].tracking.uri, tmp_path) as url:
        yield url



def test_served_model_predicts_the_students_probabilities(server, test_rows):
    x, want = test_rows
    response = requests.post(f"{server}/invocations", json={"inputs": x.tolist()}, timeout=60)
    assert response.status_code == 200, response.text[:2000]
    got = np.array(response.json()["predictions"], dtype=np.float32)
    assert got.shape == (len(x), 10)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    one = requests.post(f"{server}/invocations", json={"inputs": x[:1].tolist()}, timeout=60)  # a batch of one
    np.testing.assert_allclose(one.json()["predictions"], want[:1], atol=1e-5)


def test_torchscript_copy_predicts_the_same(student_run, exported, test_rows):
    import mlflow

    mlflow.set_tracking_uri(student_run[0].tracking.uri)
    path = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1/extra_files/{TORCHSCRIPT_FILE}")
    scripted = torch.jit.load(path)
    x, want = test_rows
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(x)).numpy(), want, atol=1e-5)
        assert scripted(torch.from_numpy(x[:3])).shape == (3, 10)       # any batch size, not the traced one


def test_export_config_logs_a_new_run_and_registers_it(student_run, exported, capsys):
    from mlflow.tracking import MlflowClient

    cfg, _, run_id, tmp = student_run
    config = write_config(tmp, cfg.to_dict(), "export.yaml")
    assert main(["export", "--config", str(config), "--name", NAME]) == 0
    assert f"registered '{NAME}' version 2" in capsys.readouterr().out
    client = MlflowClient(cfg.tracking.uri)
    version = client.get_model_version(NAME, "2")
    assert version.run_id != run_id and client.get_run(version.run_id).data.tags["ensemblekd.stage"] == "export"


def test_bad_input_is_one_line(student_run, tmp_path, capsys):
    cfg, _, _, _ = student_run
    import mlflow

    with tracking.mlflow_run(cfg, "evaluate") as info:      # a run with no student
        pass
    with tracking.mlflow_run(cfg, "distill") as old:        # a student logged before export: logits, no tag
        mlflow.pytorch.log_model(torch.nn.Linear(64, 10), name=export.STUDENT_MODEL, serialization_format="pt2",
                                 input_example=np.zeros((2, 64), np.float32), pip_requirements=["torch"])
    cases = [
        (["export", "0" * 32, "--tracking-uri", cfg.tracking.uri], "no MLflow run '" + "0" * 32),
        (["export", info["run_id"], "--tracking-uri", cfg.tracking.uri], "has no student model"),
        (["export", old["run_id"], "--tracking-uri", cfg.tracking.uri], "outputs logits"),
        (["export", "abc", "--tracking-uri", f"http://127.0.0.1:{free_port()}"], "is unreachable"),
        (["export", "abc", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"], "no MLflow database"),
        (["export"], "give either RUN_ID or --config"),
    ]
    for argv, fragment in cases:
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ensemblekd: error:") and fragment in lines[0], (argv, lines)
    assert not (tmp_path / "none.db").exists()
