"""The fit stage: teachers with a `fit` block are trained in parallel Ray tasks (one per teacher)
and saved where their config points; a teacher is refitted only when its artifact is missing or
what it was trained from changed (TeacherKind.needs_fit)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.io import fs
from ensemblekd.io.ray_session import ensure_ray, require, unwrap
from ensemblekd.tasks import get_task
from ensemblekd.teachers import kind_of


def fit_one(cfg: Config, t: TeacherConfig, num_threads: int = 1) -> dict[str, Any]:
    """Train one teacher (in its Ray task); returns its name, validation accuracy and seconds."""
    fs.configure_for(cfg)
    torch.set_num_threads(num_threads)
    start = time.perf_counter()
    val_accuracy = kind_of(t).fit(cfg, t, get_task(cfg.task))
    return {"name": t.name, "val_accuracy": val_accuracy, "seconds": time.perf_counter() - start}


def fit_teachers(cfg: Config, progress: bool = True) -> list[dict[str, Any]]:
    """Fit every teacher that needs it, in parallel Ray tasks; one progress bar."""
    import ray
    from tqdm import tqdm

    todo = [t for t in cfg.teachers if kind_of(t).needs_fit(cfg, t)]
    if not todo:
        return []
    ensure_ray(cfg.ray, cfg.node_paths())
    for t in todo:
        require(f"teacher '{t.name}' (num_cpus/resources)", t.num_cpus, 0.0, t.resources)
    remote = ray.remote(fit_one)
    refs = {remote.options(num_cpus=t.num_cpus, num_gpus=0, resources=t.resources, max_retries=1).remote(cfg, t): t
            for t in todo}
    results = []
    with tqdm(total=len(refs), desc="fit teachers", unit="teacher", disable=not progress) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            results.append(unwrap(ray.get, done[0]))
            acc = results[-1]["val_accuracy"]
            bar.set_postfix_str(f"{results[-1]['name']}: val acc " + ("n/a" if acc is None else f"{acc:.3f}"))
            bar.update()
    return results
