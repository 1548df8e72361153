"""MLflow runs, written by the driver only (Ray Train reports reach the driver's run through a
callback on the driver's node: stages.distill.MlflowLogger).

No tracking URI means MLflow's default (sqlite:///mlflow.db in the working directory); it is made
absolute so Ray workers, whose working directory differs, write to the same database.

A run ends FINISHED, FAILED (an error), or KILLED (Ctrl-C, SIGTERM). A process killed outright
(SIGKILL, the OOM killer) cannot end its run: each run is tagged with its host and pid, and the next
run started in the experiment ends this host's RUNNING runs whose process is gone as KILLED.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from ensemblekd.config import Config, flatten
from ensemblekd.errors import UserError

HOST_TAG, PID_TAG = "ensemblekd.host", "ensemblekd.pid"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread while a run is open: it unwinds like Ctrl-C, so the run
    ends KILLED and the CLI exits with one line."""


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
    experiment = mlflow.set_experiment(cfg.tracking.experiment)
    end_orphaned_runs(experiment.experiment_id)
    with _sigterm_raises(), _run(run_name=cfg.tracking.run_name) as run:
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
def _run(**start_run_kwargs: Any) -> Iterator[Any]:
    """mlflow.start_run, tagged with its host and pid, ending KILLED when interrupted: MLflow's own
    context manager says FAILED for any exception, Ctrl-C included."""
    import mlflow

    run = mlflow.start_run(**start_run_kwargs)
    status = "FAILED"
    try:
        mlflow.set_tags({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
        yield run
        status = "FINISHED"
    except BaseException as exc:
        # Ctrl-C or our SIGTERM handler; or Ray's, which ray.init puts in place of ours: sys.exit(SIGTERM).
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == signal.SIGTERM):
            status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a run is open, SIGTERM raises Terminated, so the run is ended (KILLED) before the
    process exits; by default SIGTERM ends the process at once and the run stays RUNNING. Python
    runs signal handlers in the main thread only: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def end_orphaned_runs(experiment_id: str) -> None:
    """End as KILLED the runs of `experiment_id` left RUNNING by a process of this host that is gone
    (SIGKILL, OOM killer, power loss): nothing else would ever end them. Another host's pid means
    nothing here, and a live pid may be a run in progress: both are left alone. Best effort: a
    tracking error here must not stop the new run, and the next run tries again."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient()
        found = client.search_runs([experiment_id], max_results=1000, filter_string=(
            f"attributes.status = 'RUNNING' and tags.\"{HOST_TAG}\" = '{socket.gethostname()}'"))
        for run in found:
            if not _alive(run.data.tags.get(PID_TAG)):
                client.set_terminated(run.info.run_id, "KILLED")
    except Exception:
        pass


def _alive(pid: str | None) -> bool:
    """Whether process `pid` of this host exists; True when that cannot be told (no or bad tag)."""
    try:
        os.kill(int(pid), 0)  # type: ignore[arg-type]  # pid None raises TypeError, caught below: alive
    except ProcessLookupError:
        return False
    except (OSError, TypeError, ValueError, OverflowError):  # PermissionError: alive, another user's
        return True
    return True


@contextmanager
def nested_run(parent: dict[str, str], name: str, params: dict[str, Any]) -> Iterator[dict[str, str]]:
    """A child run of the current run (one level of a TAKD chain); yields its id and URI."""
    import mlflow

    with _run(run_name=name, nested=True) as run:
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
