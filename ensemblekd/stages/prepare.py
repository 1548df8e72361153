"""The prepare stage: what a config asks to be made before anything runs, each piece only when
missing or stale: built-in teachers (`teachers[i].prepare`), built-in data sets (`data.prepare`)
and a user's text tokenized into token sequences (`data.text`, task token)."""

from __future__ import annotations

from ensemblekd.config import Config
from ensemblekd.data.text import prepare_inputs
from ensemblekd.tasks import get_task
from ensemblekd.teachers import kind_of


def prepare(cfg: Config) -> None:
    for t in cfg.teachers:
        kind_of(t).prepare(cfg, t)
    prepare_inputs(cfg.data, get_task(cfg.task).tokenizer(cfg))
