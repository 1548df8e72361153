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
from ensemblekd.errors import UserError
from ensemblekd.models import count_parameters
from ensemblekd.store import Store
from ensemblekd.teachers import build_model, load_state, predict
from ensemblekd.weighting import build_strategy


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    keep = y >= 0
    return float((pred[keep] == y[keep]).mean()) if keep.any() else None


def evaluate(cfg: Config, student_uri: str) -> dict[str, Any]:
    names = [t.name for t in cfg.teachers]
    store = Store.open(cfg.store.uri)
    store.check_complete("test", names)
    d = cfg.data
    ids, x, y = read_split(d.test, d.features, d.label, d.id)
    per_teacher = []
    for name in names:
        parts = [store.read("test", name, i) for i in range(len(store.inputs("test")))]
        if not np.array_equal(np.concatenate([p[0] for p in parts]), ids):
            raise UserError(f"{store.uri}: test logits of '{name}' are not aligned with data.test; re-run label")
        per_teacher.append(np.concatenate([p[1] for p in parts]).astype(np.float32))
    z = torch.from_numpy(np.stack(per_teacher, axis=1))
    ensemble_probs, _ = build_strategy(cfg.distill, names).targets(z, None, 1.0)
    ensemble_pred = ensemble_probs.argmax(-1).numpy()

    student = load_state(build_model(cfg.student.model, cfg.student.kwargs, "student.model"), student_uri, "student")
    student_logits = predict(student, x)
    student_pred = student_logits.argmax(1)

    rows = []
    teacher_params = teacher_bytes = 0
    for t, logits in zip(cfg.teachers, per_teacher):
        params = count_parameters(build_model(t.model, t.kwargs))
        size = storage.file_size(cfg.teacher_checkpoint(t))
        teacher_params += params
        teacher_bytes += size
        rows.append({"model": t.name, "role": "teacher", "accuracy": _accuracy(logits.argmax(1), y),
                     "fidelity": float((logits.argmax(1) == ensemble_pred).mean()), "params": params, "bytes": size})
    rows.append({"model": "ensemble", "role": "ensemble", "accuracy": _accuracy(ensemble_pred, y), "fidelity": 1.0,
                 "params": teacher_params, "bytes": teacher_bytes})
    rows.append({"model": "student", "role": "student", "accuracy": _accuracy(student_pred, y),
                 "fidelity": float((student_pred == ensemble_pred).mean()), "params": count_parameters(student),
                 "bytes": storage.file_size(student_uri)})
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
