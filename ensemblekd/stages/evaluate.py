"""The evaluate stage: teachers, their ensemble, any chain levels (TAKD assistants, born-again
generations) and the student on the test split.

Quality comes from the task (task.quality): the teachers' and levels' stored test targets (no
teacher is run again), the ensemble mixed from them as the run mixes it (at T = 1, without
labels), the student run here; every model measured against the ensemble (ensemblekd.metrics).

Cost comes from the models themselves: each is loaded by its teacher kind and timed in this
process, on CPU with one thread, one model after another, after a warm-up. The ensemble's forward
is every teacher in sequence plus the mix: what serving the ensemble costs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from ensemblekd.config import Config
from ensemblekd.io import fs
from ensemblekd.mixing import build_strategy
from ensemblekd.models import build_student, count_parameters, load_student
from ensemblekd.stages.chain import assistant_teachers, baseline_config, level_role
from ensemblekd.stages.student_init import read_record
from ensemblekd.stages.train import STUDENT_FILE
from ensemblekd.stages.validate import check_labelled_inputs
from ensemblekd.store import Store
from ensemblekd.tasks import Task, get_task
from ensemblekd.teachers import kind_of

LATENCY_BATCHES = (1, 64)
LATENCY_KEYS = [f"p{q}_ms_b{b}" for b in LATENCY_BATCHES for q in (50, 99)]
BASELINE = "student_alone"  # the row of the student trained on the labels alone (evaluate.baseline)
PRUNED = "pruned"           # the row of student.init's pruned model before any training


@contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def measure_latency(forward: Callable[[Any], Any], xb: Any, warmup: int = 20, repeats: int = 200) -> tuple[float, float]:
    """(p50, p99) milliseconds of forward(xb) on a batch of inputs (Task.latency_batch), after
    `warmup` untimed calls. Threads are the caller's choice (evaluate uses one)."""
    for _ in range(warmup):
        forward(xb)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        forward(xb)
        times[i] = time.perf_counter() - start
    p50, p99 = np.percentile(times * 1000, [50, 99])
    return float(p50), float(p99)


def evaluate(cfg: Config, student_uri: str, warmup: int | None = None, repeats: int | None = None) -> dict[str, Any]:
    """Rows for each teacher, the ensemble, each chain level (role assistant, or generation for
    born_again), the student (and with evaluate.baseline the student trained alone): accuracy,
    fidelity, KL, ECE and what the task adds (Task.columns; task token: NLL, perplexity, tokens/s),
    parameters, bytes, p50/p99 latency at batch 1 and 64 (None with repeats=0); plus the
    student-against-ensemble summary and, for evaluate.prompts, each model's greedy continuations.
    warmup/repeats: evaluate.* by default."""
    ev = cfg.evaluate
    warmup, repeats = (ev.warmup if warmup is None else warmup), (ev.repeats if repeats is None else repeats)
    task = get_task(cfg.task)
    names = [t.name for t in cfg.teachers]
    assistants, role = assistant_teachers(cfg), level_role(cfg)
    store = Store.open(cfg.store.uri)
    store.check_complete("test", [*names, *(a.name for a in assistants)])
    check_labelled_inputs(cfg, store, ("test",))
    members = task.ensemble_members(cfg, names)
    strategy = build_strategy(cfg.distill, members, store.val_accuracy(members), cfg.trainer.epochs, ensemble=True)
    student = load_student(cfg.student, student_uri)
    quality, targets = task.quality(cfg, store, names, [a.name for a in assistants], student, strategy)
    baseline_uri = fs.join(baseline_config(cfg).trainer.output_dir, STUDENT_FILE)
    baseline = load_student(cfg.student, baseline_uri) if ev.baseline and fs.exists(baseline_uri) else None
    if baseline is not None:
        quality[BASELINE] = task.quality(cfg, store, names, [], baseline, strategy)[0]["student"]
    pruned = build_student(cfg.student).eval() if cfg.student.init else None  # student.init's weights, untrained
    if pruned is not None:
        quality[PRUNED] = task.quality(cfg, store, names, [], pruned, strategy)[0]["student"]

    teachers = [kind_of(t).load(cfg, t) for t in cfg.teachers]
    rows = [_row(t.name, "teacher", quality, kind_of(t).num_parameters(m), kind_of(t).artifact_bytes(cfg, t))
            for t, m in zip(cfg.teachers, teachers)]
    mixed = [r for r in rows if r["model"] in members]
    rows.append(_row("ensemble", "ensemble", quality, sum(r["params"] for r in mixed), sum(r["bytes"] for r in mixed)))
    models = [*teachers, None]
    for a in assistants:
        module = kind_of(a).load(cfg, a)
        rows.append(_row(a.name, role, quality, count_parameters(module), kind_of(a).artifact_bytes(cfg, a)))
        models.append(module)
    rows.append(_row("student", "student", quality, count_parameters(student), fs.file_size(student_uri)))
    models.append(student)
    if baseline is not None:
        rows.append(_row(BASELINE, "baseline", quality, count_parameters(baseline), fs.file_size(baseline_uri)))
        models.append(baseline)
    if pruned is not None:
        rows.append(_row(PRUNED, "pruned", quality, count_parameters(pruned), fs.file_size(student_uri)))
        models.append(pruned)

    def ensemble_forward(xb: torch.Tensor) -> torch.Tensor:
        z = torch.stack([task.logits(m, xb, cfg) for t, m in zip(cfg.teachers, teachers) if t.name in members], dim=-2)
        return strategy.targets(z.reshape(-1, *z.shape[-2:]).float(), None, 1.0)[0].reshape(*z.shape[:-2], -1)

    x, unit = task.latency_inputs(cfg)
    with one_thread():
        for row, model in zip(rows, models):  # one model after another, in the rows' order
            xm = task.model_inputs(cfg, row["model"], x)
            for b in LATENCY_BATCHES:
                p50, p99 = (measure_latency(model or ensemble_forward, task.latency_batch(xm, b), warmup, repeats)
                            if repeats else (None, None))
                row.update({f"p50_ms_b{b}": p50, f"p99_ms_b{b}": p99})
            if row["p50_ms_b64"]:
                row.update(task.throughput(xm, 64, row["p50_ms_b64"] / 1000))
    latency = {"threads": 1, "warmup": warmup, "repeats": repeats, "batches": list(LATENCY_BATCHES)}
    if unit:
        latency["unit"] = unit
    summary, keeps = summarise(rows, task)
    found = {"rows": rows, "test_rows": targets, "summary": summary, "student_keeps": keeps, "latency": latency,
             "columns": [list(c) for c in task.columns]}
    if cfg.student.init is not None:
        found["init"] = read_record(cfg.student.init)
    if ev.prompts:
        scorers: dict[str, Callable[..., torch.Tensor]]  # inputs [1, L] -> scores [1, L, V]
        scorers = {r["model"]: (lambda xb, m=m: task.logits(m, xb, cfg)) if m is not None else ensemble_forward
                   for r, m in zip(rows, models)}
        found["continuations"] = task.continuations(cfg, scorers)
    return found


def _row(name: str, role: str, quality: dict[str, dict[str, Any]], params: int, size: int) -> dict[str, Any]:
    return {"model": name, "role": role, **quality[name], "params": params, "bytes": size}


def summarise(rows: list[dict[str, Any]], task: Task) -> tuple[dict[str, float | None], str | None]:
    """The student against running the whole ensemble: p50 speed-up, size and parameter reduction,
    accuracy gap, what the task says the student keeps (Task.summary: its values, and the phrase
    the summary line ends with); with a baseline row (the student trained alone), the share of the
    gap between it and the ensemble that distillation closed on the task's headline metric."""
    ens = next(r for r in rows if r["role"] == "ensemble")
    st = next(r for r in rows if r["role"] == "student")
    alone = next((r for r in rows if r["role"] == "baseline"), None)

    def ratio(key: str) -> float | None:
        return ens[key] / st[key] if ens[key] is not None and st[key] else None

    gap = ens["accuracy"] - st["accuracy"] if None not in (ens["accuracy"], st["accuracy"]) else None
    kept, keeps = task.summary(ens, st)
    out = {**{f"speedup_b{b}": ratio(f"p50_ms_b{b}") for b in LATENCY_BATCHES},
           "size_reduction": ratio("bytes"), "param_reduction": ratio("params"), "accuracy_gap": gap, **kept}
    key = task.headline
    if alone is not None and None not in (alone[key], st[key], ens[key]) and alone[key] != ens[key]:
        out["gap_closed"] = (alone[key] - st[key]) / (alone[key] - ens[key])
        out["gap_closed_on"] = key
    return out, keeps
