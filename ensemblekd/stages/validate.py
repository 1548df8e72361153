"""Every check that can be made of a config before any work starts: the schema's own (config),
then what each extension point knows of its keys: the task (and the keys other tasks own), every
teacher's kind, the weighting rule, the strategy and the divergence. With `touch`, also what needs the outside world: import paths, files, the
store's object store."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ensemblekd.config import Config, check_inputs
from ensemblekd.errors import UserError
from ensemblekd.data.inputs import input_shards
from ensemblekd.mixing import check_distill
from ensemblekd.store import Store
from ensemblekd.tasks import TASKS, get_task
from ensemblekd.teachers import check_teachers


def validate(cfg: Config, touch: bool = True) -> Config:
    check_task_keys(cfg)
    get_task(cfg.task).check_config(cfg)
    check_teachers(cfg, touch)
    check_distill(cfg, touch)
    if touch:
        check_inputs(cfg)
    return cfg


def check_task_keys(cfg: Config) -> None:
    """Keys that another task declares its own (Task.own_keys) are not set, and features are
    asked for only under a task that stores them (Task.stores_features)."""
    task = get_task(cfg.task)
    for other in TASKS.values():
        for key in other.own_keys:
            if other is not task and key not in task.own_keys and _is_set(cfg, key):
                raise UserError(f"{key}: only used with task: {other.name}; remove it")
    if not task.stores_features and (any(t.feature for t in cfg.teachers) or cfg.student.feature
                                     or cfg.distill.feature_terms):
        raise UserError("teachers.feature/student.feature/distill.hint_weight/rkd_*: features are stored and "
                        f"learnt from with task: {' or '.join(t.name for t in TASKS.values() if t.stores_features)} "
                        f"only, not {task.name}")


def _is_set(cfg: Config, key: str) -> bool:
    """Whether a dotted key of the config differs from the schema's default."""
    *sections, name = key.split(".")
    node: Any = cfg
    for section in sections:
        node = getattr(node, section)
    assert isinstance(node, BaseModel)
    default = type(node).model_fields[name].get_default(call_default_factory=True)
    return getattr(node, name) != default


def check_labelled_inputs(cfg: Config, store: Store, splits: tuple[str, ...]) -> None:
    """In the driver, before a stage reads the store's targets with the inputs: each split's files are
    the ones labelled (size and footer fingerprint: Store.check_inputs), and the task finds what it
    needs in them (columns, labels inside the store's classes: checked first, as the more precise
    message when a file changed that way)."""
    for split in splits:
        key = f"data.{split}"
        shards = input_shards(getattr(cfg.data, split), key)
        get_task(cfg.task).check_inputs(cfg, shards, store.num_classes)
        store.check_inputs(split, [s.signature() for s in shards], key)
