"""Tasks: what a row is and what the student learns from it, looked up once from `cfg.task`.

A new task is one module with a Task subclass plus one entry in TASKS (docs/architecture.md).
"""

from __future__ import annotations

from ensemblekd.errors import UserError
from ensemblekd.tasks.base import Served, Task, worker_segments
from ensemblekd.tasks.classification import Classification
from ensemblekd.tasks.token import Token

TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Token())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"task: unknown '{name}'; choose one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "Served", "Task", "get_task", "worker_segments"]
