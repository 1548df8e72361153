"""Teacher kinds: how a `teachers[i]` entry becomes a model that produces logits.

`teachers[i].kind` selects one of KINDS; without it, `gguf` when `pretrained` is a .gguf file,
`huggingface` when it is another path, else `torch`. A new kind (ONNX, an HTTP endpoint, ...) is one
module with a TeacherKind subclass plus one entry here, or, from outside the package,
`kind: 'module:MyKind'`; docs/architecture.md says how.
"""

from __future__ import annotations

from functools import cache

from ensemblekd.config import Config, TeacherConfig
from ensemblekd.errors import UserError
from ensemblekd.lm import GGUF_SUFFIX
from ensemblekd.plugins import check_claimed, is_import_path, record_defaults, resolve
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
    if name not in KINDS and not is_import_path(name):
        raise UserError(f"teacher '{t.name}': unknown kind '{name}'; choose one of {', '.join(KINDS)} or give "
                        "'module:MyKind'")
    return _kind(name, t.name)


@cache
def _kind(name: str, teacher: str) -> TeacherKind:
    """A built-in kind, or a TeacherKind subclass or instance given as 'module:callable', made once."""
    kind = resolve(name, KINDS, f"teachers.{teacher}.kind")
    kind = kind() if isinstance(kind, type) else kind
    if not isinstance(kind, TeacherKind):
        raise UserError(f"teacher '{teacher}': kind {name} is a {type(kind).__name__}, not an ensemblekd TeacherKind; "
                        "subclass ensemblekd.teachers.TeacherKind")
    return kind


def check_teachers(cfg: Config, touch: bool = True) -> None:
    """Every teacher's kind checks its entry (the keys only it takes: its Options; then the rest);
    with touch, also its files and import paths."""
    for t in cfg.teachers:
        kind = kind_of(t)
        check_claimed(t.extension_keys, key_of(cfg, t), {"kind": (kind.name, kind)}, {"kind": KINDS})
        record_defaults(t, kind.options(cfg, t))
        kind.check(cfg, t)
        if touch:
            kind.check_files(cfg, t)


__all__ = ["KINDS", "TeacherKind", "check_teachers", "key_of", "kind_of"]
