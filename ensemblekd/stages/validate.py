"""Every check that can be made of a config before any work starts: the schema's own (config),
then what each extension point knows of its keys: the task, every teacher's kind, the weighting
rule and the strategy. With `touch`, also what needs the outside world: import paths, files, the
store's object store."""

from __future__ import annotations

from ensemblekd.config import Config, check_inputs
from ensemblekd.data.inputs import input_shards
from ensemblekd.mixing import check_distill
from ensemblekd.store import Store
from ensemblekd.tasks import get_task
from ensemblekd.teachers import check_teachers


def validate(cfg: Config, touch: bool = True) -> Config:
    get_task(cfg.task).check_config(cfg)
    check_teachers(cfg, touch)
    check_distill(cfg, touch)
    if touch:
        check_inputs(cfg)
    return cfg


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
