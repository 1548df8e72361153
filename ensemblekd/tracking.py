"""MLflow, written by the driver (and by rank 0 of the trainer into the driver's run).

No tracking URI means MLflow's default (sqlite:///mlflow.db in the working directory); it is made
absolute so Ray workers, whose working directory differs, write to the same database.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from ensemblekd.config import Config, flatten


def absolute_tracking_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        return "file://" + os.path.abspath(uri)
    return uri


@contextmanager
def mlflow_run(cfg: Config, stage: str) -> Iterator[dict[str, str]]:
    """Open (and end) one MLflow run for a pipeline run or a single stage; yields run id and URI."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = absolute_tracking_uri(cfg.tracking.uri or mlflow.get_tracking_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:
        mlflow.set_tags({"ensemblekd.stage": stage, "ensemblekd.strategy": cfg.distill.strategy,
                         "ensemblekd.weighting": cfg.distill.weighting,
                         "ensemblekd.teachers": ",".join(t.name for t in cfg.teachers)})
        params = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in flatten(cfg.to_dict()).items()}
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), "config.yaml")
        yield {"run_id": run.info.run_id, "tracking_uri": uri, "experiment_id": run.info.experiment_id}


@contextmanager
def nested_run(parent: dict[str, str], name: str, params: dict[str, Any]) -> Iterator[dict[str, str]]:
    """A child run of the current run (one level of a TAKD chain); yields its id and URI."""
    import mlflow

    with mlflow.start_run(run_name=name, nested=True) as run:
        mlflow.set_tag("ensemblekd.level", name)
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        yield {**parent, "run_id": run.info.run_id}


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}, step=step)


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


def log_json(obj: Any, name: str) -> None:
    log_text(json.dumps(obj, indent=1, sort_keys=True), name)


def log_student(cfg: Config, student_uri: str) -> None:
    """The student as an MLflow PyTorch model (signature, input example) plus its raw state dict."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    from ensemblekd import storage
    from ensemblekd.data import read_split
    from ensemblekd.teachers import build_model, load_state

    model = load_state(build_model(cfg.student.model, cfg.student.kwargs), student_uri, "student")
    _, x, _ = read_split(cfg.data.val, cfg.data.features, None, cfg.data.id)
    example = x[:4]
    with torch.no_grad():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    mlflow.pytorch.log_model(model, name="student", signature=signature, input_example=example,
                             pip_requirements=["torch"])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "student.pt")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(student_uri))
        mlflow.log_artifact(path)
