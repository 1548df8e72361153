"""What every kind of teacher provides: the TeacherKind base class.

A kind turns one `teachers[i]` config entry into a model the stages can use without knowing where
it came from: `load` gives a torch.nn.Module that maps a batch of the task's inputs to logits
(a scikit-learn estimator is wrapped in one), `fingerprint` changes whenever its outputs could,
and `fit` trains it when the entry has a `fit` block and the kind can. Fitting is recorded in a
sidecar `<artifact>.fit.json` (the spec and fit block it was trained with), so a teacher is
refitted only when its artifact is missing or what it was trained from changed.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from torch import nn

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.models import count_parameters
from ensemblekd.plugins import Options, own_options


def key_of(cfg: Config, t: TeacherConfig) -> str:
    """The config key of a teacher, for messages: teachers.<index>."""
    return f"teachers.{cfg.teachers.index(t)}" if t in cfg.teachers else f"teacher '{t.name}'"


class TeacherKind:
    """A kind of teacher. Subclass it, set `name`, `tasks` and `suffix`, implement `load` (and `fit`
    when the kind can be trained here), declare the keys only it takes as its `Options`, and add an
    instance to teachers.KINDS."""

    name = "base"
    tasks: tuple[str, ...] = ()       # the tasks whose targets it can produce
    suffix = ".pt"                    # the default artifact's extension (trainer.output_dir/teachers/<name><suffix>)
    can_fit = False
    Options: type[Options] = Options  # the keys of a teachers[i] entry that only this kind takes: none

    def options(self, cfg: Config, t: TeacherConfig) -> Any:
        """This kind's own keys of the entry, validated by its Options."""
        return own_options(self, t.extension_keys, key_of(cfg, t))

    # -- config ----------------------------------------------------------------------------
    def check(self, cfg: Config, t: TeacherConfig) -> None:
        """Static checks of the entry's keys (no I/O); a UserError naming the key."""
        key = key_of(cfg, t)
        if cfg.task not in self.tasks:
            raise UserError(f"{key}.kind: teacher '{t.name}' is of kind {self.name}, which teaches task "
                            f"{' or '.join(self.tasks)}, not {cfg.task}")
        if t.fit is not None and not self.can_fit:
            raise UserError(f"{key}.fit: teachers of kind {self.name} cannot be fitted here; remove fit")

    def check_files(self, cfg: Config, t: TeacherConfig) -> None:
        """Checks that touch the outside world (import paths, files); run before any work."""
        if t.fit is None and not fs.exists(self.artifact(cfg, t)):
            raise UserError(f"{key_of(cfg, t)}.checkpoint: '{t.checkpoint}' does not exist; fix the path or add a fit block")

    def prepare(self, cfg: Config, t: TeacherConfig) -> None:
        """The prepare stage: put a built-in model in place when the entry asks for one."""

    # -- identity --------------------------------------------------------------------------
    def artifact(self, cfg: Config, t: TeacherConfig) -> str:
        """Where the teacher's weights live: its checkpoint, or the default place `fit` writes to."""
        return t.checkpoint or fs.join(cfg.trainer.output_dir, "teachers", f"{t.name}{self.suffix}")

    def spec(self, t: TeacherConfig) -> dict[str, Any]:
        """What the store's manifest records of the teacher (with its fingerprint); the fingerprint and
        the fit record cover it, so a change to it means relabelling (and refitting)."""
        return {"model": t.model, "kwargs": t.kwargs}

    def fingerprint(self, cfg: Config, t: TeacherConfig) -> str:
        """sha256 over the spec and the artifact's bytes: changes when either does."""
        h = hashlib.sha256(json.dumps(self.spec(t), sort_keys=True).encode())
        h.update(fs.read_bytes(self.artifact(cfg, t)))
        return h.hexdigest()[:16]

    def artifact_bytes(self, cfg: Config, t: TeacherConfig) -> int:
        """Size on disk of what serving the teacher needs."""
        return fs.file_size(self.artifact(cfg, t))

    def memory_bytes(self, cfg: Config, t: TeacherConfig) -> int:
        """About what one loaded copy of the teacher holds in memory (automatic label placement
        weighs it): by default its artifact's size, right for float32 weights."""
        return self.artifact_bytes(cfg, t)

    # -- use -------------------------------------------------------------------------------
    def load(self, cfg: Config, t: TeacherConfig) -> nn.Module:
        """The teacher as a module in eval mode: the task's input batch -> logits."""
        raise NotImplementedError(f"teacher kind {self.name} does not implement load")

    def with_features(self, cfg: Config, t: TeacherConfig, model: nn.Module) -> nn.Module:
        """The loaded teacher as a module giving (logits, feature [B, F]), for `feature` (the kind
        says what names a feature); by default a kind has none."""
        raise UserError(f"{key_of(cfg, t)}.feature: teachers of kind {self.name} give no features here; remove feature")

    def num_parameters(self, module: nn.Module) -> int:
        return count_parameters(module)

    def tokenizer(self, t: TeacherConfig) -> str | None:
        """A local tokenizer directory that comes with the teacher (task token), if any."""
        return None

    # -- fit -------------------------------------------------------------------------------
    def needs_fit(self, cfg: Config, t: TeacherConfig) -> bool:
        if t.fit is None:
            return False
        artifact = self.artifact(cfg, t)
        if not (fs.exists(artifact) and fs.exists(artifact + ".fit.json")):
            return True
        return json.loads(fs.read_bytes(artifact + ".fit.json")).get("key") != self._fit_key(cfg, t)

    def fit(self, cfg: Config, t: TeacherConfig, task) -> float | None:
        """Train the teacher on the train split, save its artifact and the fit record; returns its
        validation accuracy (None without labels)."""
        val_accuracy = self.train(cfg, t, task)
        fs.write_bytes_atomic(self.artifact(cfg, t) + ".fit.json",
                              json.dumps({"key": self._fit_key(cfg, t), "val_accuracy": val_accuracy}).encode())
        return val_accuracy

    def train(self, cfg: Config, t: TeacherConfig, task) -> float | None:
        """The kind's own training: fit, save the artifact, return the validation accuracy."""
        raise NotImplementedError(f"teacher kind {self.name} cannot be fitted")

    def _fit_key(self, cfg: Config, t: TeacherConfig) -> dict[str, Any]:
        assert t.fit is not None  # only teachers with a fit section are fitted
        return {**self.spec(t), "fit": t.fit.model_dump(), "train": cfg.data.train}
