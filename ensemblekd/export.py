"""`ensemblekd export`: register a run's student in the MLflow Model Registry, ready to serve.

`run` and `distill` already log the served model (`tracking.log_student`: class probabilities,
signature, input example, TorchScript copy), so exporting a run is only registration; exporting
a config first logs its trainer.output_dir/student.pt in a new run.
"""

from __future__ import annotations

import shlex
from typing import Any

from ensemblekd import storage, tracking
from ensemblekd.config import Config
from ensemblekd.errors import UserError


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
        filter_string=f"source_run_id = '{run_id}' AND name = '{tracking.STUDENT_MODEL}'")
    if not models:
        raise UserError(f"RUN_ID: run '{run_id}' has no student model; export a run of `ensemblekd run` or "
                        "`ensemblekd distill`, or use --config CONFIG")
    model = max(models, key=lambda m: m.creation_timestamp)
    if model.tags.get(tracking.OUTPUTS_TAG) != "probabilities":
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
    from ensemblekd.pipeline import student_path

    student = student_path(cfg)
    if not storage.exists(student):
        raise UserError(f"trainer.output_dir: no student at '{student}'; train it first: ensemblekd distill CONFIG")
    with tracking.mlflow_run(cfg, "export") as info:
        tracking.log_student(cfg, student)
    return export_run(info["run_id"], name, info["tracking_uri"])


def serve_command(result: dict[str, Any], port: int = 5001) -> str:
    """The exact `mlflow models serve` line for a registered version, from any directory."""
    return (f"MLFLOW_TRACKING_URI={shlex.quote(result['tracking_uri'])} mlflow models serve "
            f"-m models:/{result['name']}/{result['version']} --env-manager local -p {port}")
