"""MLflow runs, written by the driver only (Ray Train reports reach the driver's run through a
callback on the driver's node: stages.distill.MlflowLogger).

No tracking URI means MLflow's default (sqlite:///mlflow.db in the working directory); it is made
absolute so Ray workers, whose working directory differs, write to the same database.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from ensemblekd.config import Config, flatten
from ensemblekd.errors import UserError



def absolute_tracking_uri(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        return "file://" + os.path.abspath(uri)
    return uri


def existing_tracking_uri(given: str | None = None) -> str:
    """The tracking URI to read from (`given`, else MLFLOW_TRACKING_URI, else MLflow's default), made
    absolute and checked: a UserError if its database is missing or its server does not answer (MLflow
    would create an empty database, or retry a dead server for minutes)."""
    import mlflow
    import requests

    uri = absolute_tracking_uri(given or mlflow.get_tracking_uri())
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        raise UserError(f"--tracking-uri: no MLflow database at {uri}; pass --tracking-uri or set MLFLOW_TRACKING_URI")
    if uri.startswith(("http://", "https://")):
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=10)
        except requests.RequestException as exc:
            raise UserError(f"--tracking-uri: MLflow server {uri} is unreachable ({type(exc).__name__}); "
                            "start it or fix the URI") from None
    return uri


@contextmanager
def mlflow_run(cfg: Config, stage: str) -> Iterator[dict[str, str]]:
    """Open (and end) one MLflow run for a pipeline run or a single stage; yields run id and URI."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # MLflow draws a tqdm bar ("Downloading artifacts") whenever it reads artifacts back, e.g.
    # when log_model validates the input example by loading the logged model: ours draws the
    # only bars. Its own switch, read at every use; an explicit setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = absolute_tracking_uri(cfg.tracking.uri or mlflow.get_tracking_uri())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:
        # The columns of `ensemblekd compare`, as tags so the UI's run list and compare view show them.
        mlflow.set_tags({"ensemblekd.stage": stage, "ensemblekd.strategy": cfg.distill.strategy,
                         "ensemblekd.weighting": cfg.distill.weighting,
                         "ensemblekd.temperature": str(cfg.distill.temperature), "ensemblekd.alpha": str(cfg.distill.alpha),
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
