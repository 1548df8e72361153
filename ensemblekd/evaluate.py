"""The evaluate stage: teachers, their ensemble and the student on the test split.

Teacher logits come from the store (no teacher is run again); the ensemble is mixed as the run
mixes it (at T = 1, without labels); the student runs in this process on CPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ensemblekd import storage
from ensemblekd.config import Config
from ensemblekd.data import read_split
from ensemblekd.distill import strategy_for
from ensemblekd.models import count_parameters
from ensemblekd.store import Store
from ensemblekd.teachers import build_model, load_state, predict


def accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    keep = y >= 0
    return float((pred[keep] == y[keep]).mean()) if keep.any() else None


def evaluate(cfg: Config, student_uri: str, assistants: list[str] = ()) -> dict[str, Any]:
    """Rows for each teacher, the ensemble, each TAKD assistant (from their stored test logits)
    and the student (run here): accuracy, fidelity to the ensemble, parameters, bytes on disk."""
    from ensemblekd.pipeline import level_configs

    names = [t.name for t in cfg.teachers]
    store = Store.open(cfg.store.uri)
    store.check_complete("test", [*names, *assistants])
    d = cfg.data
    ids, x, y = read_split(d.test, d.features, d.label, d.id)
    per_teacher = [store.read_split("test", name, ids) for name in names]
    ensemble_probs, _ = strategy_for(cfg, store, ensemble=True).targets(torch.from_numpy(np.stack(per_teacher, axis=1)), None, 1.0)
    ensemble_pred = ensemble_probs.argmax(-1).numpy()

    def row(name, role, pred, params, size):
        return {"model": name, "role": role, "accuracy": accuracy(pred, y),
                "fidelity": float((pred == ensemble_pred).mean()), "params": params, "bytes": size}

    rows = [row(t.name, "teacher", logits.argmax(1), count_parameters(build_model(t.model, t.kwargs)),
                storage.file_size(cfg.teacher_checkpoint(t))) for t, logits in zip(cfg.teachers, per_teacher)]
    rows.append({**row("ensemble", "ensemble", ensemble_pred, sum(r["params"] for r in rows),
                       sum(r["bytes"] for r in rows)), "fidelity": 1.0})
    if assistants:
        by_name = {t.name: t for _, level in level_configs(cfg) for t in level.teachers}
        for name in assistants:
            t = by_name[name]
            rows.append(row(name, "assistant", store.read_split("test", name, ids).argmax(1),
                            count_parameters(build_model(t.model, t.kwargs)), storage.file_size(t.checkpoint)))
    student = load_state(build_model(cfg.student.model, cfg.student.kwargs, "student.model"), student_uri, "student")
    rows.append(row("student", "student", predict(student, x).argmax(1), count_parameters(student),
                    storage.file_size(student_uri)))
    return {"rows": rows, "test_rows": len(y)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: model, role, accuracy, fidelity, params, size."""
    header = ("model", "role", "test acc", "fidelity", "params", "size")
    lines = [(r["model"], r["role"], "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%",
              f"{100 * r['fidelity']:.2f}%", f"{r['params']:,}", _human(r["bytes"])) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*l) for l in lines])


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
