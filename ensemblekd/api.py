"""The public Python API: what `import ensemblekd` exports, and what the CLI calls.

Every function takes a config as a YAML path, a mapping or a Config, with optional `key.path=value`
overrides, and returns a typed result. `run` is the pipeline: prepare, fit, label, distill,
evaluate in one Ray session and one MLflow run.

    import ensemblekd as ekd
    result = ekd.run("configs/digits.yaml", overrides=["trainer.epochs=5"])
    print(result.table, result.run_id)
    logits = ekd.open_store(result.store).targets("wide_mlp", "test").logits
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ensemblekd import tracking
from ensemblekd.config import Config, parse_config
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.io.ray_session import ray_session
from ensemblekd.stages import chain, report
from ensemblekd.stages.distill import DistillResult, preflight
from ensemblekd.stages.evaluate import evaluate as evaluate_models
from ensemblekd.stages.export import export_config, export_run, log_student, serve_command
from ensemblekd.stages.prepare import prepare
from ensemblekd.stages.label import LabelResult
from ensemblekd.stages.label import label as label_store
from ensemblekd.stages.student_init import init_student, log_init
from ensemblekd.stages.train import STUDENT_FILE
from ensemblekd.stages.validate import validate
from ensemblekd.store import Store, StoreView
from ensemblekd.tasks import get_task

ConfigSource = str | os.PathLike | dict | Config


# -- results -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRow:
    """One model of an evaluation (accuracies are fractions; latency in ms on one CPU thread)."""

    model: str
    role: str                                   # teacher | ensemble | assistant | generation | student
                                                # | baseline | pruned (student.init, untrained)
    accuracy: float | None                      # task token: top-1 next-token accuracy
    fidelity: float | None                      # top-1 agreement with the ensemble
    kl: float | None                            # mean KL(ensemble || model), nats
    ece: float | None
    params: int
    bytes: int
    p50_ms_b1: float | None = None
    p99_ms_b1: float | None = None
    p50_ms_b64: float | None = None
    p99_ms_b64: float | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
                                                # what the task adds (Task.columns), e.g. task token's nll
                                                # (per token, nats), perplexity, tokens_per_s (batch 64, 1 thread)


@dataclass(frozen=True)
class Evaluation:
    rows: list[ModelRow]
    summary: dict[str, float | None]            # speedup_b1, speedup_b64, size_reduction, param_reduction, accuracy_gap
                                                # (+ gap_closed with evaluate.baseline; the task's own, e.g.
                                                # perplexity_retained for LMs)
    report: dict[str, Any]                      # everything, as written to report/report.json
    run_id: str | None = None

    @classmethod
    def of(cls, report_: dict[str, Any], run_id: str | None = None) -> Evaluation:
        keys = {f.name for f in fields(ModelRow)} - {"metrics"}
        rows = [ModelRow(**{k: r.get(k) for k in keys}, metrics={k: v for k, v in r.items() if k not in keys})
                for r in report_["rows"]]
        return cls(rows, report_["summary"], report_, run_id)

    def row(self, model: str) -> ModelRow:
        return next(r for r in self.rows if r.model == model)

    @property
    def table(self) -> str:
        """The plain-text tables `ensemblekd run` prints."""
        return report.format_report(self.report)

    @property
    def markdown(self) -> str:
        return report.format_markdown(self.report)


@dataclass(frozen=True)
class RunResult:
    run_id: str
    tracking_uri: str
    student: str
    store: str
    evaluation: Evaluation
    seconds: float
    distill: DistillResult | None = None

    @property
    def table(self) -> str:
        return self.evaluation.table


# -- the functions -------------------------------------------------------------------------------
def load_config(config: ConfigSource, overrides: list[str] | None = None, check: bool = True) -> Config:
    """A validated Config. Every static mistake is a one-line UserError (prefixed with the config
    file); with check, also what needs the outside world (import paths, teacher files, the data,
    the store's object store)."""
    cfg = parse_config(config, overrides)
    try:
        validate(cfg, touch=check)
        chain.level_configs(cfg)  # the chain's levels are named apart from the teachers
        return cfg
    except UserError as exc:
        if isinstance(config, (str, os.PathLike)):
            raise UserError(f"{config}: {exc}") from None
        raise


def label(config: ConfigSource, overrides: list[str] | None = None, progress: bool = True,
          repair: bool = False) -> LabelResult:
    """Prepare the built-in data if asked, fit the teachers that need it, and label every missing
    shard of the store (repair: first verify every committed shard and relabel corrupt ones)."""
    cfg = load_config(config, overrides)
    with ray_session():
        prepare(cfg)
        result = label_store(cfg, progress=progress, repair=repair)
    return result


def distill(config: ConfigSource, overrides: list[str] | None = None, progress: bool = True) -> DistillResult:
    """Train the student from the store, in a new MLflow run that also logs the served student."""
    cfg = load_config(config, overrides)
    started = init_student(cfg, progress)
    strategy = preflight(cfg)  # before the MLflow run: a store that cannot be trained from makes no run
    with ray_session(), tracking.mlflow_run(cfg, "distill") as info:
        log_init(started)
        result = chain.distill_chain(cfg, info, progress, strategy)
        if cfg.tracking.log_model:
            log_student(cfg, result.student)
    return replace(result, run_id=info["run_id"], tracking_uri=info["tracking_uri"])


def evaluate(config: ConfigSource, overrides: list[str] | None = None, student: str | None = None,
             warmup: int | None = None, repeats: int | None = None) -> Evaluation:
    """Teachers, ensemble, assistants (or generations) and student on the test split, in a new MLflow run. `student`:
    a state dict (default trainer.output_dir/student.pt); warmup/repeats default to evaluate.warmup
    and evaluate.repeats; repeats=0 skips the latency timing."""
    cfg = load_config(config, overrides)
    with tracking.mlflow_run(cfg, "evaluate") as info:
        found = evaluate_models(cfg, student or student_path(cfg), warmup=warmup, repeats=repeats)
        report.log_report(cfg, found)
    return Evaluation.of(found, info["run_id"])


def run(config: ConfigSource, overrides: list[str] | None = None, progress: bool = True) -> RunResult:
    """All stages: prepare, fit, label, distill, evaluate; everything lands in one MLflow run (made once
    the whole config has been checked)."""
    cfg = load_config(config, overrides)
    start = time.perf_counter()
    with tracking.mlflow_run(cfg, "run") as info:
        with ray_session():  # a Ray started here is shut down before evaluate times the models
            prepare(cfg)
            labelled = label_store(cfg, progress=progress)  # fits the teachers that need it first
            store = Store.open(cfg.store.uri)
            tracking.log_metrics({f"label_{k}": getattr(labelled, k) for k in ("shards", "rows", "seconds")})
            tracking.log_metrics({f"teacher_val_accuracy.{t.name}": store.teacher(t.name).get("val_accuracy")
                                  for t in cfg.teachers})
            tracking.log_json(store.manifest, "store/manifest.json")
            tracking.log_json(labelled.actors, "label/actors.json")
            log_init(init_student(cfg, progress))  # after label: a teacher fitted there can start the student
            trained = chain.distill_chain(cfg, info, progress)
            if cfg.evaluate.baseline:
                chain.distill_baseline(cfg, info, progress)
        tracking.log_metrics({"distill_seconds": trained.seconds})
        found = evaluate_models(cfg, trained.student)
        report.log_report(cfg, found)
        if cfg.tracking.log_model:
            log_student(cfg, trained.student)
        seconds = time.perf_counter() - start
        tracking.log_metrics({"pipeline_seconds": seconds})
    return RunResult(info["run_id"], info["tracking_uri"], trained.student, cfg.store.uri,
                     Evaluation.of(found, info["run_id"]), seconds, trained)


def open_store(uri: str, storage_options: dict[str, Any] | None = None) -> StoreView:
    """A soft-target store, to read (nothing it offers writes): `teachers`, `splits`, `table(teacher, split)` (pyarrow),
    `targets(teacher, split)` (numpy, decoded by the store's task), `verify()`, `describe()`.
    storage_options: fsspec options for an object store (else AWS_* variables)."""
    uri = fs.resolve_uri(uri)
    if storage_options:
        fs.configure(uri.split("://", 1)[0], storage_options)
    fs.check_reachable(uri, "STORE_URI")
    store = Store.open(uri)
    return StoreView(store, get_task(store.task) if store.task else None)


def export(run_id: str | None = None, config: ConfigSource | None = None, overrides: list[str] | None = None,
           name: str | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Register a run's student (or a config's trainer.output_dir/student.pt, logged in a new run)
    in the MLflow Model Registry; returns name, version, run_id, model_id, tracking_uri and `serve`,
    the `mlflow models serve` command line."""
    if (run_id is None) == (config is None):
        raise UserError("export: give either RUN_ID or --config CONFIG")
    if config is not None:
        cfg = load_config(config, overrides)
        if tracking_uri:
            cfg.tracking.uri = tracking_uri
        result = export_config(cfg, name)
    else:
        assert run_id is not None  # exactly one of run_id and config is given
        result = export_run(run_id, name, tracking_uri)
    return {**result, "serve": serve_command(result)}


def student_path(cfg: Config) -> str:
    return fs.join(cfg.trainer.output_dir, STUDENT_FILE)


