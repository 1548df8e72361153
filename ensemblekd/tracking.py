"""MLflow, written by the driver (and by rank 0 of the trainer into the driver's run).

No tracking URI means MLflow's default (sqlite:///mlflow.db in the working directory); it is made
absolute so Ray workers, whose working directory differs, write to the same database.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from ensemblekd.config import Config, flatten
from ensemblekd.errors import UserError

STUDENT_MODEL = "student"                       # the logged model `run` and `distill` leave in their run
TORCHSCRIPT_FILE = "student.torchscript.pt"     # its TorchScript copy, under extra_files/
OUTPUTS_TAG = "ensemblekd.outputs"              # "probabilities"; absent on students logged before export existed


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


def log_student(cfg: Config, student_uri: str) -> None:
    """Log the student as the MLflow PyTorch model STUDENT_MODEL that predicts class probabilities,
    plus its raw state dict `student.pt`. The one place that builds the served model (`ensemblekd
    export` only registers it).

    The model is softmax(student(x)) at temperature 1: the distillation temperature only softens
    the targets during training, and the student's own prediction is its T=1 distribution (the
    one its accuracy is measured on). Saved as a torch.export program (pt2: no pickle, no
    ensemblekd code needed to load it) with a signature (float32 [-1, F] -> float32 [-1, C]), an
    input example (4 validation rows), and a TorchScript copy in `extra_files/TORCHSCRIPT_FILE`
    (torch.jit.load, from Python or C++ libtorch, without MLflow).
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from ensemblekd import storage
    from ensemblekd.data import read_split
    from ensemblekd.teachers import build_model, load_state

    logits = load_state(build_model(cfg.student.model, cfg.student.kwargs, "student.model"), student_uri, "student")
    if cfg.task == "token":  # token ids int64 [-1, -1] -> next-token probabilities [-1, -1, V] at every position
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from ensemblekd.token_pipeline import serving_model

        model, example = serving_model(cfg, logits)
        signature = ModelSignature(Schema([TensorSpec(np.dtype("int64"), (-1, -1))]),
                                   Schema([TensorSpec(np.dtype("float32"), (-1, -1, cfg.data.vocab_size))]))
    else:
        model = torch.nn.Sequential(logits, torch.nn.Softmax(dim=-1)).eval()
        _, x, _ = read_split(cfg.data.val, cfg.data.features, None, cfg.data.id)
        example = x[:4]
        with torch.no_grad():
            signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if cfg.task != "token":  # a trace of a Hugging Face LM fixes its shapes: the pt2 program is the served one
            extra.append(os.path.join(tmp, TORCHSCRIPT_FILE))
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript; libtorch still loads it
                torch.jit.save(torch.jit.trace(model, torch.from_numpy(example)), extra[0])
        mlflow.pytorch.log_model(model, name=STUDENT_MODEL, signature=signature, input_example=example,
                                 serialization_format="pt2", extra_files=extra or None, pip_requirements=["torch"],
                                 tags={OUTPUTS_TAG: "probabilities"})
        path = os.path.join(tmp, "student.pt")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(student_uri))
        mlflow.log_artifact(path)
