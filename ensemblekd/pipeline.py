"""One thin entry point per stage, and `run`, which chains them in one Ray session and one MLflow run."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from typing import Any

from ensemblekd import storage, tracking
from ensemblekd.config import Config, check_inputs
from ensemblekd.data import prepare_for_config
from ensemblekd.ray_session import ray_session


def prepare_and_fit(cfg: Config, progress: bool = True) -> list[dict[str, Any]]:
    """The optional first stages: write data.prepare's data set, fit teachers with a fit block."""
    from ensemblekd.teachers import fit_teachers

    prepare_for_config(cfg.data)
    check_inputs(cfg)
    return fit_teachers(cfg, progress)


def label_stage(cfg: Config, progress: bool = True, repair: bool = False) -> dict[str, Any]:
    from ensemblekd.label import label

    fitted = prepare_and_fit(cfg, progress)
    result = label(cfg, progress=progress, repair=repair)
    return {"fitted": fitted, **result}


def level_configs(cfg: Config) -> list[tuple[str, Config]]:
    """The TAKD chain as one config per level: ensemble -> assistant 1 -> ... -> student.

    Level i distils assistant i (the last level: the student) from the ensemble teachers plus
    assistant i-1, whose checkpoint is the level above's student.pt and which the chain labels
    into the store like any teacher before level i starts.
    """
    from ensemblekd.config import StudentConfig, TeacherConfig
    from ensemblekd.distill import STUDENT_FILE

    levels, previous = [], None
    for a in [*cfg.distill.assistants, None]:
        name = a.name if a else "student"
        out = cfg.trainer.output_dir if a is None else storage.join(cfg.trainer.output_dir, "assistants", name)
        teachers = list(cfg.teachers)
        if previous is not None:
            teachers.append(TeacherConfig(
                name=previous.name, model=previous.model, kwargs=previous.kwargs, replicas=previous.replicas,
                num_cpus=previous.num_cpus, num_gpus=previous.num_gpus, batch_size=previous.batch_size,
                checkpoint=storage.join(cfg.trainer.output_dir, "assistants", previous.name, STUDENT_FILE)))
        student = cfg.student if a is None else StudentConfig(model=a.model, kwargs=a.kwargs)
        trainer = cfg.trainer.model_copy(update={"output_dir": out})
        levels.append((name, cfg.model_copy(update={"teachers": teachers, "student": student, "trainer": trainer})))
        previous = a
    return levels


def distill_stage(cfg: Config, info: dict[str, str] | None, progress: bool = True) -> dict[str, Any]:
    """Distil the student; with strategy assistant, each level of the chain in its nested run."""
    from ensemblekd.distill import distill
    from ensemblekd.label import label

    if cfg.distill.strategy != "assistant" or not cfg.distill.assistants:
        return {**distill(cfg, info, progress), "chain": []}
    levels = level_configs(cfg)
    chain, seconds = [], 0.0
    for i, (name, level_cfg) in enumerate(levels):
        params = {"level": i, "model": level_cfg.student.model, "kwargs": json.dumps(level_cfg.student.kwargs, sort_keys=True),
                  "teachers": ",".join(t.name for t in level_cfg.teachers)}
        with tracking.nested_run(info, name, params) if info else nullcontext(None) as level_info:
            result = distill(level_cfg, level_info, progress)
            if i + 1 < len(levels):  # an assistant: label it into the store for the next level
                label(levels[i + 1][1], progress=progress)
        seconds += result["seconds"]
        chain.append({"name": name, "student": result["student"], "val_accuracy": result["metrics"]["val_accuracy"]})
    return {**result, "seconds": seconds, "chain": chain}


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """All stages: prepare, fit, label, distill, evaluate; everything lands in one MLflow run."""
    from ensemblekd.evaluate import evaluate, format_report
    from ensemblekd.store import Store

    start = time.perf_counter()
    with tracking.mlflow_run(cfg, "run") as info:
        with ray_session():  # a Ray started here is shut down before evaluate times the models
            labelled = label_stage(cfg, progress)
            store = Store.open(cfg.store.uri)
            tracking.log_metrics({f"label_{k}": labelled[k] for k in ("shards", "rows", "seconds")})
            tracking.log_metrics({f"teacher_val_accuracy.{n}": t.get("val_accuracy")
                                  for n, t in store.m["teachers"].items() if n in {t.name for t in cfg.teachers}})
            tracking.log_json(store.m, "store/manifest.json")
            trained = distill_stage(cfg, info, progress)
        tracking.log_metrics({"distill_seconds": trained["seconds"]})
        report = evaluate(cfg, trained["student"], assistants=[c["name"] for c in trained["chain"][:-1]])
        log_report(cfg, report)
        tracking.log_student(cfg, trained["student"])
        table = format_report(report)
        seconds = time.perf_counter() - start
        tracking.log_metrics({"pipeline_seconds": seconds})
    return {"table": table, "report": report, "run_id": info["run_id"], "tracking_uri": info["tracking_uri"],
            "student": trained["student"], "seconds": seconds, "store": cfg.store.uri}


def log_report(cfg: Config, report: dict[str, Any]) -> None:
    """The report as metrics, and as files under trainer.output_dir/report/ and the run's report/:
    report.json, table.md, table.txt, bubble.png.

    Metrics: test_accuracy.<model>, latency_p50_ms_b1.<model> (p50/p99, batch 1/64), the
    student's fidelity, KL, ECE, parameters and bytes, and the summary (speedup_b1, speedup_b64,
    size_reduction, param_reduction, student_accuracy_gap = ensemble - student test accuracy).
    """
    import os
    import tempfile

    import mlflow

    from ensemblekd.evaluate import (
        LATENCY_KEYS,
        bubble_chart,
        format_markdown,
        format_report,
    )

    metrics = {f"test_accuracy.{row['model']}": row["accuracy"] for row in report["rows"]}
    metrics.update({f"latency_{key}.{row['model']}": row[key] for row in report["rows"] for key in LATENCY_KEYS})
    student = next(row for row in report["rows"] if row["role"] == "student")
    metrics.update({f"student_{k}": student[k] for k in ("fidelity", "kl", "ece", "params", "bytes")})
    s = report["summary"]
    metrics.update(speedup_b1=s["speedup_b1"], speedup_b64=s["speedup_b64"], size_reduction=s["size_reduction"],
                   param_reduction=s["param_reduction"], student_accuracy_gap=s["accuracy_gap"])
    tracking.log_metrics(metrics)
    files = {"report.json": json.dumps(report, indent=1, sort_keys=True).encode(),
             "table.md": format_markdown(report).encode(), "table.txt": (format_report(report) + "\n").encode(),
             "bubble.png": bubble_chart(report)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
            storage.write_bytes_atomic(storage.join(cfg.trainer.output_dir, "report", name), data)
        mlflow.log_artifacts(tmp, "report")


def student_path(cfg: Config) -> str:
    from ensemblekd.distill import STUDENT_FILE

    return storage.join(cfg.trainer.output_dir, STUDENT_FILE)
