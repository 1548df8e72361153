"""Reports of an evaluation: two plain-text tables (quality; CPU latency), a markdown table, a
bubble chart (size, accuracy, latency), and all of it logged to MLflow and trainer.output_dir/report/."""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, cast

from ensemblekd import tracking
from ensemblekd.config import Config
from ensemblekd.io import fs
from ensemblekd.stages.evaluate import LATENCY_KEYS
from ensemblekd.stages.student_init import describe
from ensemblekd.tables import human_bytes, markdown_table, text_table

COST_HEADER = ("model", "p50 @1", "p99 @1", "p50 @64", "p99 @64")


def _cell(v: float | None, fmt: str) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if fmt == "%" else format(v, fmt)


def _quality_header(report: dict[str, Any]) -> list[str]:
    return ["model", "role", *(header for header, _, _ in report["columns"]), "params", "size"]


def _quality_cells(report: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """A row's cells under the columns its task declared (Task.columns), between model/role and params/size."""
    return [r["model"], r["role"], *(_cell(r.get(key), fmt) for _, key, fmt in report["columns"]),
            f"{r['params']:,}", human_bytes(r["bytes"])]


def _cost_cells(r: dict[str, Any]) -> list[str]:
    return [_cell(r.get(k), ".3f") for k in LATENCY_KEYS]


def summary_line(report: dict[str, Any]) -> str:
    s = report["summary"]
    size = f"{s['size_reduction']:.1f}x smaller on disk ({s['param_reduction']:.1f}x fewer parameters)"
    if report.get("student_keeps"):
        size += f", {report['student_keeps']}"
    if s.get("gap_closed") is not None:
        size += (f";\n  distillation closed {100 * s['gap_closed']:.1f}% of the {s['gap_closed_on']} gap between the "
                 "student trained alone and the ensemble")
    if s["speedup_b1"] is None:
        return f"student vs. ensemble: {size}"
    return (f"student vs. ensemble: {s['speedup_b1']:.1f}x faster at batch 1, {s['speedup_b64']:.1f}x at batch 64 "
            f"(p50),\n  {size}")


def init_line(report: dict[str, Any]) -> list[str]:
    """What the student kept of the teacher it started from (student.init), when it did."""
    return [describe(report["init"])] if report.get("init") else []


def continuations_text(report: dict[str, Any], width: int = 100) -> list[str]:
    """Greedy continuations (task token), one line per model under each prompt."""
    out, prompt = [], None
    for c in report.get("continuations", []):
        if c["prompt"] != prompt:
            prompt = c["prompt"]
            out += ["", f"greedy continuation of {prompt!r}:"]
        out.append(f"  {c['model']:<14} {json.dumps(c['text'], ensure_ascii=False)[:width]}")
    return out


def format_report(report: dict[str, Any]) -> str:
    """Two plain-text tables (quality; CPU latency in ms), the summary line and any greedy
    continuations, ~80 columns (a little wider for a language model's table)."""
    rows = report["rows"]
    out = [text_table(_quality_header(report), [_quality_cells(report, r) for r in rows], left=2)]
    if report["latency"]["repeats"]:
        lat = report["latency"]
        out += ["", f"latency, ms (1 CPU thread, batch 1 and 64, {lat['repeats']} runs after {lat['warmup']} warm-up)",
                text_table(COST_HEADER, [[r["model"], *_cost_cells(r)] for r in rows])]
    return "\n".join([*out, "", summary_line(report), *init_line(report), *continuations_text(report)])


def format_markdown(report: dict[str, Any]) -> str:
    """One markdown table with every column, then the summary line and any continuations."""
    header = [*_quality_header(report), *(f"{h} (ms)" for h in COST_HEADER[1:])]
    lines = [[*_quality_cells(report, r), *_cost_cells(r)] for r in report["rows"]]
    extra = "\n".join([*init_line(report), *continuations_text(report)])
    return markdown_table(header, lines, left=2) + "\n\n" + summary_line(report) + "\n" + (
        f"\n```{extra}\n```\n" if extra else "")


ROLE_COLOURS = {"teacher": "tab:blue", "ensemble": "tab:red", "assistant": "tab:green", "generation": "tab:purple",
                "pruned": "tab:gray", "student": "tab:orange"}


def bubble_chart(report: dict[str, Any]) -> bytes:
    """PNG: x size on disk (log), y test accuracy, bubble area proportional to p50 latency at batch 1."""
    from matplotlib.figure import Figure

    rows = [r for r in report["rows"] if r["accuracy"] is not None]
    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    ax = fig.subplots()
    lat = [r["p50_ms_b1"] or 0.0 for r in rows]
    top = max(lat) or 1.0
    for r, ms in zip(rows, lat):
        area = 60 + 1800 * ms / top  # points^2
        ax.scatter(r["bytes"] / 1024, 100 * r["accuracy"], s=area, alpha=0.55, label=r["role"],
                   color=ROLE_COLOURS.get(r["role"], "tab:gray"), edgecolors="black", linewidths=0.6)
        label = r["model"] + (f"\n{ms:.3f} ms" if r["p50_ms_b1"] is not None else "")
        ax.annotate(label, (r["bytes"] / 1024, 100 * r["accuracy"]), xytext=(0, -(area ** 0.5 / 2 + 2)),
                    textcoords="offset points", ha="center", va="top", fontsize=8)
    handles = cast("dict[str, Any]", {h.get_label(): h for h in ax.collections})  # one legend entry per role (a str)
    for handle in ax.legend(handles.values(), handles.keys(), loc="upper left", fontsize=8).legend_handles:
        handle.set_sizes([40])  # type: ignore[union-attr]  # a scatter's legend handle: a PathCollection
    ax.set_xscale("log")
    ax.set_xlabel("size on disk (KB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("size, accuracy and CPU latency (bubble area: p50 at batch 1, 1 thread)", fontsize=10)
    ax.margins(x=0.25, y=0.3)
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def log_report(cfg: Config, report: dict[str, Any]) -> None:
    """The report as metrics, and as files under trainer.output_dir/report/ and the run's report/:
    report.json, table.md, table.txt, bubble.png.

    Metrics: test_<key>.<model> for accuracy and each of the task's columns (test_accuracy,
    test_ece, ...; task token: test_perplexity, test_nll, test_tokens_per_s), latency_p50_ms_b1.<model>
    (p50/p99, batch 1/64), the student's fidelity, KL, ECE, parameters and bytes, and every value of the
    summary (speedup_b1, speedup_b64, size_reduction, param_reduction, student_accuracy_gap = ensemble -
    student test accuracy, gap_closed, and the task's own: perplexity_retained).
    """
    import mlflow

    metrics = {f"test_{key}.{row['model']}": row.get(key) for row in report["rows"]
               for key in ("accuracy", *(key for _, key, _ in report["columns"]))}
    metrics.update({f"latency_{key}.{row['model']}": row[key] for row in report["rows"] for key in LATENCY_KEYS})
    student = next(row for row in report["rows"] if row["role"] == "student")
    metrics.update({f"student_{k}": student[k] for k in ("fidelity", "kl", "ece", "params", "bytes")})
    s = report["summary"]
    metrics.update({("student_accuracy_gap" if k == "accuracy_gap" else k): v for k, v in s.items()
                    if not isinstance(v, str)})  # every value of the summary (Task.summary's too); not gap_closed_on
    tracking.log_metrics(metrics)
    files = {"report.json": json.dumps(report, indent=1, sort_keys=True).encode(),
             "table.md": format_markdown(report).encode(), "table.txt": (format_report(report) + "\n").encode(),
             "bubble.png": bubble_chart(report)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
            fs.write_bytes_atomic(fs.join(cfg.trainer.output_dir, "report", name), data)
        mlflow.log_artifacts(tmp, "report")
