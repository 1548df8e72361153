"""One thin entry point per stage, and `run`, which chains them in one Ray session and one MLflow run."""

from __future__ import annotations

import time
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


def label_stage(cfg: Config, progress: bool = True) -> dict[str, Any]:
    from ensemblekd.label import label

    fitted = prepare_and_fit(cfg, progress)
    result = label(cfg, progress=progress)
    return {"fitted": fitted, **result}


def run(cfg: Config, progress: bool = True) -> dict[str, Any]:
    """All stages: prepare, fit, label, distill, evaluate; everything lands in one MLflow run."""
    from ensemblekd.distill import distill
    from ensemblekd.evaluate import evaluate, format_table
    from ensemblekd.store import Store

    start = time.perf_counter()
    with ray_session(), tracking.mlflow_run(cfg, "run") as info:
        labelled = label_stage(cfg, progress)
        store = Store.open(cfg.store.uri)
        tracking.log_metrics({f"label_{k}": v for k, v in labelled.items() if k != "fitted"})
        tracking.log_metrics({f"teacher_val_accuracy.{n}": t.get("val_accuracy") for n, t in store.m["teachers"].items()
                              if n in {t.name for t in cfg.teachers}})
        tracking.log_json(store.m, "store/manifest.json")
        trained = distill(cfg, info)
        tracking.log_metrics({"distill_seconds": trained["seconds"]})
        report = evaluate(cfg, trained["student"])
        log_report(report)
        tracking.log_student(cfg, trained["student"])
        table = format_table(report["rows"])
        import mlflow

        mlflow.log_text(table + "\n", "report/table.txt")
        seconds = time.perf_counter() - start
        tracking.log_metrics({"pipeline_seconds": seconds})
    return {"table": table, "report": report, "run_id": info["run_id"], "tracking_uri": info["tracking_uri"],
            "student": trained["student"], "seconds": seconds, "store": cfg.store.uri}


def log_report(report: dict[str, Any]) -> None:
    """test_accuracy.<teacher|ensemble|student>, and the student's fidelity, parameters and bytes."""
    metrics = {f"test_accuracy.{row['model']}": row["accuracy"] for row in report["rows"]}
    student = next(row for row in report["rows"] if row["role"] == "student")
    metrics.update(student_fidelity=student["fidelity"], student_params=student["params"], student_bytes=student["bytes"])
    tracking.log_metrics(metrics)
    tracking.log_json(report, "report/report.json")


def student_path(cfg: Config) -> str:
    from ensemblekd.distill import STUDENT_FILE

    return storage.join(cfg.trainer.output_dir, STUDENT_FILE)
