"""The served student: logged to MLflow by `run` and `distill` (log_student), registered in the
MLflow Model Registry by `ensemblekd export`.

Exporting a run is only registration; exporting a config first logs its
trainer.output_dir/student.pt in a new run.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
from typing import Any

from ensemblekd import tracking
from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.models import load_student
from ensemblekd.stages.train import STUDENT_FILE
from ensemblekd.tasks import get_task

STUDENT_MODEL = "student"                       # the logged model `run` and `distill` leave in their run
OUTPUTS_TAG = "ensemblekd.outputs"              # "probabilities", or "text" (a generating LM); absent on students
                                                # logged before export existed


def log_student(cfg: Config, student_uri: str) -> None:
    """Log the student as the MLflow model STUDENT_MODEL (the task's served model: Task.log_model;
    classification gives class probabilities at T = 1, token next-token probabilities, text class
    probabilities from texts), plus its raw state dict `student.pt`."""
    import mlflow

    get_task(cfg.task).log_model(cfg, load_student(cfg.student, student_uri), STUDENT_MODEL,
                                 {OUTPUTS_TAG: "probabilities"})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, STUDENT_FILE)
        with open(path, "wb") as f:
            f.write(fs.read_bytes(student_uri))
        mlflow.log_artifact(path)


def export_run(run_id: str, name: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Register the student model of run `run_id` as a new version of `name` (default: <experiment>-student)."""
    import logging

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = tracking.existing_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise UserError(f"RUN_ID: no MLflow run '{run_id}' in {uri}; take the id `ensemblekd run` printed, "
                        "or pass --tracking-uri") from None
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{STUDENT_MODEL}'")
    if not models:
        raise UserError(f"RUN_ID: run '{run_id}' has no student model; export a run of `ensemblekd run` or "
                        "`ensemblekd distill` made with tracking.log_model true (the default), or use --config CONFIG")
    model = max(models, key=lambda m: m.creation_timestamp)
    if OUTPUTS_TAG not in model.tags:
        raise UserError(f"RUN_ID: the student of run '{run_id}' was logged by an older ensemblekd and outputs logits; "
                        "export it with --config CONFIG instead")
    name = name or f"{client.get_experiment(run.info.experiment_id).name}-student"
    mlflow.set_tracking_uri(uri)
    try:
        version = mlflow.register_model(f"models:/{model.model_id}", name)
    except MlflowException as exc:
        raise UserError(f"--name: cannot register '{name}' ({exc.message.splitlines()[0]})") from None
    return {"name": name, "version": version.version, "run_id": run_id, "model_id": model.model_id, "tracking_uri": uri}


def export_config(cfg: Config, name: str | None = None) -> dict[str, Any]:
    """Log the config's trained student (trainer.output_dir/student.pt) in a new run, then register it."""
    student = fs.join(cfg.trainer.output_dir, STUDENT_FILE)
    if not fs.exists(student):
        raise UserError(f"trainer.output_dir: no student at '{student}'; train it first: ensemblekd distill CONFIG")
    with tracking.mlflow_run(cfg, "export") as info:
        log_student(cfg, student)
    return export_run(info["run_id"], name, info["tracking_uri"])


def serve_command(result: dict[str, Any], port: int = 5001) -> str:
    """The exact `mlflow models serve` line for a registered version, from any directory and without
    the virtual environment activated: mlflow starts `uvicorn` by name, so the line puts this
    Python's bin directory first on PATH (without it the server exits 127)."""
    bin_dir = os.path.dirname(sys.executable)
    return (f"PATH={shlex.quote(bin_dir)}:\"$PATH\" MLFLOW_TRACKING_URI={shlex.quote(result['tracking_uri'])} "
            f"{shlex.quote(os.path.join(bin_dir, 'mlflow'))} models serve -m models:/{result['name']}/{result['version']} "
            f"--env-manager local -p {port}")
