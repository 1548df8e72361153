"""Chains of students: ensemble -> level 1 -> ... -> student, each level taught by the one above.

TAKD (Mirzadeh et al. 2020, `distill.assistants`) and born-again networks (Furlanello et al. 2018,
`distill.strategy: born_again`, `distill.generations: n`: n - 1 earlier generations of the
student's own architecture) are the same chain: distillation runs once per level; level i distils
its student from the ensemble teachers plus level i-1, whose checkpoint is the level above's
student.pt and which is labelled into the store like any teacher (kind torch) before level i
starts. Each level is a nested MLflow run.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import replace

from ensemblekd import tracking
from ensemblekd.config import AssistantConfig, Config, StudentConfig, TeacherConfig
from ensemblekd.io import fs
from ensemblekd.mixing import Strategy, strategy_class
from ensemblekd.stages.distill import DistillResult, distill
from ensemblekd.stages.label import label
from ensemblekd.stages.train import STUDENT_FILE


def level_role(cfg: Config) -> str:
    """What the levels above the student are, as the strategy declares it (Strategy.level_role:
    'assistant' for TAKD, 'generation' for born_again). Their students go to
    trainer.output_dir/<role>s/<name>; evaluation shows them with this role."""
    return strategy_class(cfg.distill).level_role


def chain_levels(cfg: Config) -> list[AssistantConfig]:
    """The levels above the student, first to last, as the strategy declares them (Strategy.chain_levels)."""
    return strategy_class(cfg.distill).chain_levels(cfg)


def level_configs(cfg: Config) -> list[tuple[str, Config]]:
    """The chain as one config per level (name, config), the last one the student's."""
    levels, previous, where = [], None, fs.join(cfg.trainer.output_dir, level_role(cfg) + "s")
    for a in [*chain_levels(cfg), None]:
        name = a.name if a else "student"
        out = cfg.trainer.output_dir if a is None else fs.join(where, name)
        teachers = list(cfg.teachers)
        if previous is not None:
            teachers.append(TeacherConfig(
                name=previous.name, model=previous.model, kwargs=previous.kwargs, **previous.label_actors(),
                feature=previous.feature if cfg.distill.feature_terms else None,
                checkpoint=fs.join(where, previous.name, STUDENT_FILE)))
        student = cfg.student if a is None else StudentConfig(model=a.model, kwargs=a.kwargs, feature=a.feature)
        trainer = cfg.trainer.model_copy(update={"output_dir": out})
        levels.append((name, cfg.model_copy(update={"teachers": teachers, "student": student, "trainer": trainer})))
        previous = a
    return levels


def assistant_teachers(cfg: Config) -> list[TeacherConfig]:
    """Each level above the student (assistant or generation) as the teacher it becomes for the
    level below (for evaluation); none without a chain."""
    levels = level_configs(cfg)
    return [level.teachers[-1] for _, level in levels[1:]]


def distill_chain(cfg: Config, info: dict[str, str] | None, progress: bool = True,
                  strategy: Strategy | None = None) -> DistillResult:
    """Distil the student; with assistants or born-again generations, each level of the chain in
    its nested run. Returns distill's result for the student with `chain`: each level's name,
    student path and val accuracy, and the seconds of all levels."""
    levels = level_configs(cfg)
    if len(levels) == 1:
        return distill(cfg, info, progress, strategy)
    chain, seconds = [], 0.0
    for i, (name, level_cfg) in enumerate(levels):
        params = {"level": i, "model": level_cfg.student.model,
                  "kwargs": json.dumps(level_cfg.student.kwargs, sort_keys=True),
                  "teachers": ",".join(t.name for t in level_cfg.teachers)}
        with tracking.nested_run(info, name, params) if info else nullcontext(None) as level_info:
            result = distill(level_cfg, level_info, progress)
            if i + 1 < len(levels):  # a level above the student: label it into the store for the next
                label(levels[i + 1][1], progress=progress)
        seconds += result.seconds
        chain.append({"name": name, "student": result.student, "val_accuracy": result.metrics["val_accuracy"]})
    return replace(result, seconds=seconds, chain=chain)


BASELINE_DIR = "baseline"


def baseline_config(cfg: Config) -> Config:
    """The student trained on the labels alone (alpha 1: no teacher term), same epochs, seed and
    batches, into trainer.output_dir/baseline: what distillation is measured against."""
    trainer = cfg.trainer.model_copy(update={"output_dir": fs.join(cfg.trainer.output_dir, BASELINE_DIR)})
    distill_cfg = cfg.distill.model_copy(update={"alpha": 1.0})
    return cfg.model_copy(update={"trainer": trainer, "distill": distill_cfg})


def distill_baseline(cfg: Config, info: dict[str, str] | None, progress: bool = True) -> DistillResult:
    """evaluate.baseline: baseline_config's student, in a nested run named 'baseline'."""
    base = baseline_config(cfg)
    with tracking.nested_run(info, BASELINE_DIR, {"alpha": 1.0}) if info else nullcontext(None) as level_info:
        return distill(base, level_info, progress)
