"""Tasks: what a row is and what the student learns from it, looked up once from `cfg.task`.

A new task is one module with a Task subclass plus one entry in TASKS, or, from outside the
package, `task: 'module:MyTask'` (docs/architecture.md).
"""

from __future__ import annotations

from functools import cache

from ensemblekd.errors import UserError
from ensemblekd.plugins import resolve
from ensemblekd.tasks.base import Column, Served, Task, worker_segments
from ensemblekd.tasks.classification import Classification
from ensemblekd.tasks.text import Text
from ensemblekd.tasks.token import Token

TASKS: dict[str, Task] = {task.name: task for task in (Classification(), Token(), Text())}


@cache
def get_task(name: str) -> Task:
    """The task `name` (a built-in, or a Task subclass or instance given as 'module:callable', made once)."""
    task = resolve(name, TASKS, "task")
    task = task() if isinstance(task, type) else task
    if not isinstance(task, Task):
        raise UserError(f"task: {name} is a {type(task).__name__}, not an ensemblekd Task; subclass "
                        "ensemblekd.tasks.Task")
    return task


__all__ = ["TASKS", "Column", "Served", "Task", "get_task", "worker_segments"]
