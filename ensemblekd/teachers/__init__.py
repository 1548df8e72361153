"""Teacher kinds: how a `teachers[i]` entry becomes a model that produces logits.

`teachers[i].kind` selects one of KINDS; without it, `gguf` when `pretrained` is a .gguf file,
`huggingface` when it is another path, else `torch`. A new kind (ONNX, an HTTP endpoint, ...) is one module with a TeacherKind subclass plus
one entry here; docs/architecture.md says how.
"""

from __future__ import annotations

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.lm import GGUF_SUFFIX
from ensemblekd.teachers.base import TeacherKind, key_of
from ensemblekd.teachers.gguf import GGUFKind
from ensemblekd.teachers.huggingface import HuggingFaceKind
from ensemblekd.teachers.pytorch import TorchKind
from ensemblekd.teachers.scikit_learn import SklearnKind

KINDS: dict[str, TeacherKind] = {kind.name: kind for kind in (TorchKind(), HuggingFaceKind(), GGUFKind(), SklearnKind())}


def kind_of(t: TeacherConfig) -> TeacherKind:
    """The kind of a teacher entry: its `kind`, else inferred from its keys."""
    pretrained = "gguf" if (t.pretrained or "").endswith(GGUF_SUFFIX) else "huggingface"
    name = t.kind or (pretrained if t.pretrained and not t.model else "torch")
    if name not in KINDS:
        raise UserError(f"teacher '{t.name}': unknown kind '{name}'; choose one of {', '.join(KINDS)}")
    return KINDS[name]


def check_teachers(cfg: Config, touch: bool = True) -> None:
    """Every teacher's kind checks its entry; with touch, also its files and import paths."""
    for t in cfg.teachers:
        kind = kind_of(t)
        kind.check(cfg, t)
        if touch:
            kind.check_files(cfg, t)


__all__ = ["KINDS", "TeacherKind", "check_teachers", "key_of", "kind_of"]
