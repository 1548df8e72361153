"""`ensemblekd compare`: one row per run of an MLflow experiment that has a student report.

Columns (the keys of --format csv/json, and the names --sort takes) are COLUMNS below. Accuracies,
fidelity and gaps are fractions; `bytes` is the student's size on disk; `p50_ms_b1` its CPU p50
latency at batch 1 in ms; `speedup_b1` the ensemble's p50 over the student's.

- acc_gap = ensemble_acc - student_acc (test accuracy), always there.
- gap_closed = (student_acc - baseline) / (ensemble_acc - baseline) (Hinton et al. 2015), where
  baseline is the mean student test accuracy of the experiment's runs trained on hard labels alone
  (distill.alpha = 1) with the same student (every student.* param) and the same data.test.
  Empty when the experiment holds no such run, and for those runs themselves.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from typing import Any

from ensemblekd.errors import UserError
from ensemblekd.tables import human_bytes, markdown_table

COLUMNS = ("run_name", "run_id", "stage", "strategy", "weighting", "temperature", "alpha", "teachers",
           "student_acc", "ensemble_acc", "fidelity", "kl", "ece", "acc_gap", "gap_closed", "params", "bytes",
           "p50_ms_b1", "p50_ms_b64", "speedup_b1", "speedup_b64")
SHOWN = ("run_name", "strategy", "weighting", "temperature", "alpha", "teachers", "student_acc", "fidelity", "kl",
         "ece", "acc_gap", "gap_closed", "bytes", "p50_ms_b1", "speedup_b1")  # the markdown table
FORMATS = ("markdown", "csv", "json")


def compare(experiment: str, tracking_uri: str | None = None, sort: str | None = None,
            descending: bool = False) -> list[dict[str, Any]]:
    """The rows, newest run first unless sorted; runs without a value for the sort column go last."""
    if sort is not None and sort not in COLUMNS:
        raise UserError(f"--sort: unknown column '{sort}'; choose one of {', '.join(COLUMNS)}")
    rows = _with_gap_closed(_runs(experiment, tracking_uri))
    if sort is not None:
        rows = sorted((r for r in rows if r[sort] is not None), key=lambda r: r[sort], reverse=descending) + [
            r for r in rows if r[sort] is None]
    return [{k: r[k] for k in COLUMNS} for r in rows]


def _runs(experiment: str, tracking_uri: str | None) -> list[dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    from ensemblekd.tracking import existing_tracking_uri

    uri = existing_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"--experiment: no experiment '{experiment}' in {uri}; it has: {', '.join(names) or 'none'}")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        runs += [row for row in map(_row, page) if row is not None]
        token = page.token
        if not token:
            return runs


def _row(run) -> dict[str, Any] | None:
    m, p, t = run.data.metrics, run.data.params, run.data.tags
    if "test_accuracy.student" not in m:
        return None  # a TAKD level, a failed run, a run from before evaluate

    def setting(name: str) -> str | None:  # tags since the compare view; params for older runs
        return t.get(f"ensemblekd.{name}", p.get(f"distill.{name}"))

    def number(value: Any, kind=float) -> float | int | None:
        return None if value in (None, "None") else kind(float(value))

    student, ensemble = m["test_accuracy.student"], m.get("test_accuracy.ensemble")
    return {"run_name": run.info.run_name, "run_id": run.info.run_id, "stage": t.get("ensemblekd.stage"),
            "strategy": setting("strategy"), "weighting": setting("weighting"),
            "temperature": number(setting("temperature")), "alpha": number(setting("alpha")),
            "teachers": t.get("ensemblekd.teachers"), "student_acc": student, "ensemble_acc": ensemble,
            "fidelity": m.get("student_fidelity"), "kl": m.get("student_kl"), "ece": m.get("student_ece"),
            "acc_gap": None if ensemble is None else ensemble - student, "gap_closed": None,
            "params": number(m.get("student_params"), int), "bytes": number(m.get("student_bytes"), int),
            "p50_ms_b1": m.get("latency_p50_ms_b1.student"), "p50_ms_b64": m.get("latency_p50_ms_b64.student"),
            "speedup_b1": m.get("speedup_b1"), "speedup_b64": m.get("speedup_b64"),
            "_same_student": tuple(sorted((k, v) for k, v in p.items() if k.startswith("student.") or k == "data.test"))}


def _with_gap_closed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    baselines: dict[tuple, list[float]] = {}
    for r in rows:
        if r["alpha"] == 1.0:
            baselines.setdefault(r["_same_student"], []).append(r["student_acc"])
    for r in rows:
        alone = baselines.get(r["_same_student"])
        if alone and r["alpha"] != 1.0 and r["ensemble_acc"] is not None:
            base = statistics.fmean(alone)
            if r["ensemble_acc"] != base:
                r["gap_closed"] = (r["student_acc"] - base) / (r["ensemble_acc"] - base)
    return rows


def render(rows: list[dict[str, Any]], fmt: str = "markdown") -> str:
    """markdown: the SHOWN columns, formatted; csv and json: every column, raw numbers (csv: empty = none)."""
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    return markdown_table(SHOWN, [[_cell(k, r[k]) for k in SHOWN] for r in rows], left=6)


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("student_acc", "ensemble_acc", "fidelity"):
        return f"{100 * v:.2f}%"
    if key == "acc_gap":
        return f"{100 * v:.2f} pt"
    if key == "gap_closed":
        return f"{100 * v:.0f}%"
    if key == "bytes":
        return human_bytes(v)
    if key in ("kl", "ece"):
        return f"{v:.3f}"
    if key.startswith("p50_ms"):
        return f"{v:.3f} ms"
    if key.startswith("speedup"):
        return f"{v:.1f}x"
    return f"{v:g}" if isinstance(v, float) else str(v)
