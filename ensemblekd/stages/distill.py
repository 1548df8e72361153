"""The distill stage, driver side: check in the driver what can be checked, then run the Ray Train
job (stages.train.train_loop on every worker), or with trainer.num_workers 0 the same worker loop
in this process, and copy the student to trainer.output_dir.

Workers never write MLflow: each report reaches the driver's run through a Ray Train callback on
the driver's node (MlflowLogger), or straight from the in-process loop (ReportLog).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ray.train import UserCallback

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.io import compat, fs
from ensemblekd.io.ray_session import driver_progress, ensure_ray, require
from ensemblekd.mixing import Strategy, build_strategy
from ensemblekd.models import build_student
from ensemblekd.store import Store
from ensemblekd.stages.validate import check_labelled_inputs
from ensemblekd.stages.train import STEP_METRICS, STUDENT_FILE, InProcessSession, epoch_steps, run_in_process, train_loop
from ensemblekd.tasks import get_task


def preflight(cfg: Config) -> Strategy:
    """Everything distill can check in the driver, before any worker starts: the store is complete
    and intact for the configured teachers, the strategy builds, and the student builds and runs on
    the data and fits the stored targets. Returns the strategy."""
    store = Store.open(cfg.store.uri)
    names = [t.name for t in cfg.teachers]
    for split in ("train", "val"):
        store.check_complete(split, names)
        store.check_sizes(split, names)
    check_labelled_inputs(cfg, store, ("train", "val"))
    strategy = build_strategy(cfg.distill, names, store.val_accuracy(names), cfg.trainer.epochs)
    student = build_student(cfg.student)
    get_task(cfg.task).preflight(cfg, store, student)
    return strategy


class ReportLog:
    """Logs each epoch's report (one metrics dict per worker) into the driver's MLflow run.

    Rank 0 sends its per-step curve along in the report ("steps"), every worker where it runs
    ("worker"): each new placement (the first, and one after every restart) is added to the
    artifact distill/workers.json, and the tag ensemblekd.train_nodes counts the nodes of the last.
    """

    def __init__(self, mlflow_info: dict[str, str] | None):
        self.info = mlflow_info
        self.placements: list[dict[str, Any]] = []

    def __call__(self, metrics: list[dict[str, Any]]) -> None:
        if not self.info:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.info["tracking_uri"])
        report = dict(metrics[0])
        workers = [m["worker"] for m in metrics]
        report.pop("worker")
        steps, epoch, now = report.pop("steps", {}), report.pop("epoch"), int(time.time() * 1000)
        if not self.placements or self.placements[-1]["workers"] != workers:
            self.placements.append({"from_epoch": int(epoch), "workers": workers})
            # log_dict writes any JSON value (json.dump); its annotation says dict
            client.log_dict(self.info["run_id"], self.placements, "distill/workers.json")  # type: ignore[arg-type]
            client.set_tag(self.info["run_id"], "ensemblekd.train_nodes", len({w["node_id"] for w in workers}))
        batch = [Metric(k, float(v), now, int(epoch)) for k, v in report.items() if v is not None]
        for i, step in enumerate(steps.get("step", [])):
            batch += [Metric(k, float(steps[k][i]), now, int(step)) for k in STEP_METRICS[1:]]
        for i in range(0, len(batch), 1000):
            client.log_batch(self.info["run_id"], metrics=batch[i:i + 1000])


class MlflowLogger(UserCallback):
    """ReportLog from Ray Train's controller.

    The controller runs on the driver's node, so tracking never depends on a worker's disk or
    network, and it sees a report only once every worker has made it and its checkpoint is
    persisted: an epoch re-run after a worker failure was never reported, so no epoch is logged
    twice.
    """

    def __init__(self, mlflow_info: dict[str, str]):
        self.log = ReportLog(mlflow_info)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        self.log(metrics)


class StopOnBadInput(UserCallback):
    """Ends the run at once when a worker raises a UserError (a shard that fails its checksum, an
    input changed under the store: what only a worker reading the data can see).

    Such an error comes back on every retry, so retrying it (trainer.max_failures) only costs
    minutes and tracebacks. Ray Train's failure policy retries any worker error, but raises at once
    on an error of its controller that is not a startup error: a callback raising ControllerError
    is one (ray/train/v2/_internal/execution/failure_handling/default.py)."""

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        import ray.train

        for exc in worker_exceptions.values():
            cause = getattr(exc, "cause", exc)
            if isinstance(cause, UserError):
                raise ray.train.ControllerError(UserError(str(cause)))


@dataclass(frozen=True)
class DistillResult:
    student: str                                # trainer.output_dir/student.pt
    metrics: dict[str, Any]                     # the last epoch's: val_accuracy, train_loss, teacher_weight.<name>, ...
    seconds: float
    run_id: str | None = None                   # the MLflow run (None when called inside `run`'s run)
    tracking_uri: str | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)    # chain levels: name, student, val_accuracy


def distill(cfg: Config, mlflow_info: dict[str, str] | None = None, progress: bool = True,
            strategy: Strategy | None = None) -> DistillResult:
    """Train the student; returns the final metrics, the student's path and the seconds. `strategy`
    is preflight's, when the caller ran it already."""
    strategy = strategy or preflight(cfg)
    plan = strategy.describe()
    if mlflow_info and plan:
        from mlflow.tracking import MlflowClient

        MlflowClient(mlflow_info["tracking_uri"]).set_tag(mlflow_info["run_id"], "ensemblekd.stages", plan)
    tr = cfg.trainer
    start = time.perf_counter()
    rows = sum(s["rows"] for s in Store.open(cfg.store.uri).inputs("train"))
    total = epoch_steps(rows, tr.world_size, tr.batch_size // tr.world_size) * tr.epochs
    run = _run_in_process if tr.num_workers == 0 else _run_on_ray_train
    metrics, student = run(cfg, mlflow_info, total, progress)
    seconds = time.perf_counter() - start
    student_uri = fs.join(tr.output_dir, STUDENT_FILE)
    fs.write_bytes_atomic(student_uri, student)
    get_task(cfg.task).save_student(cfg, student_uri)
    metrics = {k: v for k, v in metrics.items() if k not in ("steps", "worker")}
    return DistillResult(student_uri, metrics, seconds)


def _run_on_ray_train(cfg: Config, mlflow_info, total: int, progress: bool) -> tuple[dict[str, Any], bytes]:
    """The Ray Train job; the last report's metrics and the student file's bytes."""
    ensure_ray(cfg.ray, cfg.node_paths())
    tr = cfg.trainer
    require("trainer.cpus_per_worker/use_gpu", tr.cpus_per_worker, 1.0 if tr.use_gpu else 0.0)
    with driver_progress("distill", total, progress) as counter:
        result = _fit(_trainer(cfg, mlflow_info, counter))
    with result.checkpoint.as_directory() as d:
        return result.metrics, open(os.path.join(d, STUDENT_FILE), "rb").read()


def _run_in_process(cfg: Config, mlflow_info, total: int, progress: bool) -> tuple[dict[str, Any], bytes]:
    """trainer.num_workers 0: the worker loop in this process (stages.train.InProcessSession)."""
    import io

    import torch
    from tqdm import tqdm

    with tqdm(total=total, desc="distill", unit="step", disable=not progress) as bar:
        session = InProcessSession(ReportLog(mlflow_info), lambda step: bar.update(step - bar.n))
        run_in_process(cfg, session)
    buffer = io.BytesIO()
    torch.save(session.student, buffer)
    return session.metrics, buffer.getvalue()


def _trainer(cfg: Config, mlflow_info: dict[str, str] | None, counter):
    import ray.train
    from ray.train.torch import TorchTrainer

    tr = cfg.trainer
    compat.ray_train_driver_env()
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "progress": counter},
        scaling_config=ray.train.ScalingConfig(num_workers=tr.num_workers, use_gpu=tr.use_gpu, resources_per_worker={
            "CPU": tr.cpus_per_worker, **({"GPU": 1} if tr.use_gpu else {})}),
        # ray.train gives Ray Train V2's RunConfig at run time (is_v2_enabled); the type checker sees V1's
        run_config=ray.train.RunConfig(  # type: ignore[call-arg]
            name=f"distill-{int(time.time())}",
            storage_path=fs.join(tr.output_dir, "ray_train"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=tr.max_failures),
            callbacks=[StopOnBadInput(), *([MlflowLogger(mlflow_info)] if mlflow_info else [])],  # type: ignore[list-item]
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            worker_runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}} if not tr.use_gpu else None,
        ),
    )


def _fit(trainer):
    """trainer.fit(); a bad input a worker found stays a one-line error."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.ControllerError as exc:
        if isinstance(exc.controller_failure, UserError):
            raise UserError(str(exc.controller_failure)) from None
        raise
    except ray.train.WorkerGroupError as exc:
        for failure in exc.worker_failures.values():
            cause = getattr(failure, "cause", failure)
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
        raise
