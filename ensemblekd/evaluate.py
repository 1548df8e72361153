"""The evaluate stage: teachers, their ensemble, any TAKD assistants and the student on the test split.

Quality comes from logits: the teachers' and assistants' stored test logits (no teacher is run
again), the ensemble mixed from them as the run mixes it (at T = 1, without labels), the student
run here. Every model is measured against the ensemble p_ens: fidelity is top-1 agreement, KL is
the mean over test rows of KL(p_ens || softmax(z)) at T = 1, in nats. ECE (Guo et al. 2017) uses 15
equal-width confidence bins over labelled rows: sum_b |B_b|/n * |accuracy(B_b) - confidence(B_b)|.

Cost comes from the models themselves: each is loaded from its checkpoint and timed in this
process, on CPU with one thread, one model after another, after a warm-up. The ensemble's forward
is every teacher in sequence plus the mix: what serving the ensemble costs.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ensemblekd import storage
from ensemblekd.config import Config
from ensemblekd.data import read_split
from ensemblekd.distill import strategy_for
from ensemblekd.models import count_parameters
from ensemblekd.store import Store
from ensemblekd.tables import human_bytes, markdown_table, text_table
from ensemblekd.teachers import build_model, load_state, load_teacher, predict

LATENCY_BATCHES = (1, 64)
LATENCY_KEYS = [f"p{q}_ms_b{b}" for b in LATENCY_BATCHES for q in (50, 99)]


def accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    keep = y >= 0
    return float((pred[keep] == y[keep]).mean()) if keep.any() else None


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float | None:
    """ECE over the labelled rows; bin b holds confidences in (b/bins, (b+1)/bins]."""
    keep = y >= 0
    if not keep.any():
        return None
    probs, y = probs[keep], y[keep]
    conf, correct = probs.max(1), probs.argmax(1) == y
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    return float(sum(abs(correct[index == b].mean() - conf[index == b].mean()) * (index == b).sum()
                     for b in range(bins) if (index == b).any()) / len(y))


def mean_kl(target: np.ndarray, logits: np.ndarray) -> float:
    """Mean over rows of KL(target || softmax(logits)), nats (0 log 0 = 0)."""
    return float(F.kl_div(F.log_softmax(torch.from_numpy(logits).float(), -1), torch.from_numpy(target).float(),
                          reduction="batchmean"))


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def measure_latency(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int, warmup: int = 20,
                    repeats: int = 200) -> tuple[float, float]:
    """(p50, p99) milliseconds of forward() on `batch` rows of x (repeated if x has fewer), after
    `warmup` untimed calls. Threads are the caller's choice (evaluate uses one)."""
    xb = x.repeat(-(-batch // len(x)), 1)[:batch]
    for _ in range(warmup):
        forward(xb)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        forward(xb)
        times[i] = time.perf_counter() - start
    p50, p99 = np.percentile(times * 1000, [50, 99])
    return float(p50), float(p99)


def evaluate(cfg: Config, student_uri: str, assistants: list[str] = (), warmup: int = 20,
             repeats: int = 200) -> dict[str, Any]:
    """Rows for each teacher, the ensemble, each TAKD assistant and the student: accuracy, fidelity,
    KL, ECE, parameters, bytes, and p50/p99 latency at batch 1 and 64 (None with repeats=0);
    plus the student-against-ensemble summary (speed-up, size reduction, accuracy gap)."""
    from ensemblekd.pipeline import level_configs

    if cfg.task == "token":
        from ensemblekd.token_pipeline import evaluate as evaluate_tokens

        return evaluate_tokens(cfg, student_uri, warmup, repeats)
    names = [t.name for t in cfg.teachers]
    store = Store.open(cfg.store.uri)
    store.check_complete("test", [*names, *assistants])
    d = cfg.data
    ids, x, y = read_split(d.test, d.features, d.label, d.id)
    strategy = strategy_for(cfg, store, ensemble=True)

    def mix(teacher_logits: torch.Tensor) -> torch.Tensor:  # [B, K, C] -> ensemble probabilities [B, C]
        return strategy.targets(teacher_logits, None, 1.0)[0]

    stored = {n: store.read_split("test", n, ids) for n in [*names, *assistants]}
    p_ens = mix(torch.from_numpy(np.stack([stored[n] for n in names], axis=1))).numpy()
    teachers = [load_teacher(cfg, t) for t in cfg.teachers]
    models = [(t.name, "teacher", teacher, stored[t.name], cfg.teacher_checkpoint(t))
              for t, teacher in zip(cfg.teachers, teachers)]
    by_name = {t.name: t for _, level in level_configs(cfg) for t in level.teachers} if assistants else {}
    for name in assistants:
        t = by_name[name]
        module = load_state(build_model(t.model, t.kwargs), t.checkpoint, f"assistant '{name}'")
        models.append((name, "assistant", module, stored[name], t.checkpoint))
    student = load_state(build_model(cfg.student.model, cfg.student.kwargs, "student.model"), student_uri, "student")
    models.append(("student", "student", student, predict(student, x), student_uri))

    rows = [{"model": name, "role": role, "accuracy": accuracy(logits.argmax(1), y),
             "fidelity": float((logits.argmax(1) == p_ens.argmax(1)).mean()), "kl": mean_kl(p_ens, logits),
             "ece": expected_calibration_error(torch.softmax(torch.from_numpy(logits), -1).numpy(), y),
             "params": count_parameters(module), "bytes": storage.file_size(uri)}
            for name, role, module, logits, uri in models]
    teacher_rows = rows[:len(names)]
    rows.insert(len(names), {"model": "ensemble", "role": "ensemble", "accuracy": accuracy(p_ens.argmax(1), y),
                             "fidelity": 1.0, "kl": 0.0, "ece": expected_calibration_error(p_ens, y),
                             "params": sum(r["params"] for r in teacher_rows),
                             "bytes": sum(r["bytes"] for r in teacher_rows)})

    def ensemble_forward(xb: torch.Tensor) -> torch.Tensor:
        return mix(torch.stack([teacher(xb) for teacher in teachers], dim=1))

    forwards = [*teachers, ensemble_forward, *(m[2] for m in models[len(names):])]
    xt = torch.from_numpy(x)
    with one_thread():
        for row, forward in zip(rows, forwards):  # the row order: one model after another
            for b in LATENCY_BATCHES:
                p50, p99 = measure_latency(forward, xt, b, warmup, repeats) if repeats else (None, None)
                row.update({f"p50_ms_b{b}": p50, f"p99_ms_b{b}": p99})
    latency = {"threads": 1, "warmup": warmup, "repeats": repeats, "batches": list(LATENCY_BATCHES)}
    return {"rows": rows, "test_rows": len(y), "summary": summarise(rows), "latency": latency}


def summarise(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """The student against running the whole ensemble: p50 speed-up, size and parameter reduction, accuracy gap."""
    ens = next(r for r in rows if r["role"] == "ensemble")
    st = next(r for r in rows if r["role"] == "student")

    def ratio(key: str) -> float | None:
        return ens[key] / st[key] if ens[key] is not None and st[key] else None

    gap = ens["accuracy"] - st["accuracy"] if None not in (ens["accuracy"], st["accuracy"]) else None
    return {**{f"speedup_b{b}": ratio(f"p50_ms_b{b}") for b in LATENCY_BATCHES},
            "size_reduction": ratio("bytes"), "param_reduction": ratio("params"), "accuracy_gap": gap}


# -- presentation ---------------------------------------------------------------------------
QUALITY_HEADER = ("model", "role", "test acc", "fidelity", "KL", "ECE", "params", "size")
COST_HEADER = ("model", "p50 @1", "p99 @1", "p50 @64", "p99 @64")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _quality_cells(r: dict[str, Any]) -> list[str]:
    return [r["model"], r["role"], _pct(r["accuracy"]), _pct(r["fidelity"]), _num(r["kl"], ".3f"),
            _num(r["ece"], ".3f"), f"{r['params']:,}", human_bytes(r["bytes"])]


def _cost_cells(r: dict[str, Any]) -> list[str]:
    return [_num(r.get(k), ".3f") for k in LATENCY_KEYS]


def summary_line(report: dict[str, Any]) -> str:
    s = report["summary"]
    size = f"{s['size_reduction']:.1f}x smaller on disk ({s['param_reduction']:.1f}x fewer parameters)"
    if s["accuracy_gap"] is not None:
        size += f", {100 * s['accuracy_gap']:.2f} points lower test accuracy"
    if s["speedup_b1"] is None:
        return f"student vs. ensemble: {size}"
    return (f"student vs. ensemble: {s['speedup_b1']:.1f}x faster at batch 1, {s['speedup_b64']:.1f}x at batch 64 "
            f"(p50),\n  {size}")


def format_report(report: dict[str, Any]) -> str:
    """Two plain-text tables (quality; CPU latency in ms) and the summary line, ~80 columns."""
    rows = report["rows"]
    out = [text_table(QUALITY_HEADER, [_quality_cells(r) for r in rows], left=2)]
    if report["latency"]["repeats"]:
        lat = report["latency"]
        out += ["", f"latency, ms (1 CPU thread, batch 1 and 64, {lat['repeats']} runs after {lat['warmup']} warm-up)",
                text_table(COST_HEADER, [[r["model"], *_cost_cells(r)] for r in rows])]
    return "\n".join([*out, "", summary_line(report)])


def format_markdown(report: dict[str, Any]) -> str:
    """One markdown table with every column, then the summary line."""
    header = [*QUALITY_HEADER, *(f"{h} (ms)" for h in COST_HEADER[1:])]
    lines = [[*_quality_cells(r), *_cost_cells(r)] for r in report["rows"]]
    return markdown_table(header, lines, left=2) + "\n\n" + summary_line(report) + "\n"


ROLE_COLOURS = {"teacher": "tab:blue", "ensemble": "tab:red", "assistant": "tab:green", "student": "tab:orange"}


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
    handles = {h.get_label(): h for h in ax.collections}  # one legend entry per role
    for handle in ax.legend(handles.values(), handles.keys(), loc="upper left", fontsize=8).legend_handles:
        handle.set_sizes([40])
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
