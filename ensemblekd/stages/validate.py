"""Every check that can be made of a config before any work starts: the schema's own (config),
then what each extension point knows of its keys: the task, every teacher's kind, the weighting
rule and the strategy. With `touch`, also what needs the outside world: import paths, files, the
store's object store."""

from __future__ import annotations

from ensemblekd.config import Config, check_inputs
from ensemblekd.mixing import check_names
from ensemblekd.tasks import get_task
from ensemblekd.teachers import check_teachers


def validate(cfg: Config, touch: bool = True) -> Config:
    get_task(cfg.task).check_config(cfg)
    check_teachers(cfg, touch)
    check_names(cfg.distill, resolve=touch)
    if touch:
        check_inputs(cfg)
    return cfg
