"""Extensions named in a config: 'module:callable' strings resolved to the callable they name, and
the keys each extension owns (its `Options` model), validated where the extension is chosen.

An extension of a config section (a strategy, weighting rule or divergence in `distill`) declares
the keys it takes as a pydantic model, its `Options` attribute. Those keys sit in the section
beside the section's own, are validated by that model, and are handed to the extension: the
section's schema never lists them, and a built-in and a user's 'module:callable' are configured
the same way.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ensemblekd.errors import UserError


class Options(BaseModel):
    """The keys an extension takes from its config section; subclass it as the extension's `Options`
    (an extension without one takes none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def options_class(extension: Any) -> type[BaseModel]:
    """The extension's `Options` model (a pydantic model), or the empty one; an Options model
    stands for itself (a built-in divergence is a function, so its registry holds its Options)."""
    if isinstance(extension, type) and issubclass(extension, BaseModel):
        return extension
    cls = getattr(extension, "Options", None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else Options


def own_options(extension: Any, given: Mapping[str, Any], section: str) -> Any:
    """The extension's options from the keys of `given` (a section's extra keys) that its Options
    declares; a one-line UserError naming `section.key` when one is invalid."""
    cls = options_class(extension)
    try:
        return cls.model_validate({k: v for k, v in given.items() if k in cls.model_fields})
    except ValidationError as exc:
        raise UserError(format_error(exc, section)) from None


def record_defaults(section: BaseModel, options: BaseModel) -> None:
    """Write an extension's options, defaults included, into its section's extra keys, so that the
    config's dump (MLflow params, config.yaml) says every value the run used, as it does for the
    section's own keys."""
    assert section.__pydantic_extra__ is not None  # an extended section (extra keys allowed)
    section.__pydantic_extra__.update(options.model_dump(mode="json"))


def check_claimed(given: Mapping[str, Any], section: str, chosen: Mapping[str, tuple[str, Any]],
                  built_in: Mapping[str, Mapping[str, Any]]) -> None:
    """Each key of `given` is owned by exactly one chosen extension ({point: (name, extension)});
    a key that none owns is named with the built-ins that would take it: 'distill.generations:
    only used with strategy: born_again'."""
    owners: dict[str, str] = {}
    for point, (name, extension) in chosen.items():
        for key in options_class(extension).model_fields:
            if key in owners:
                raise UserError(f"{section}.{key}: taken by both {owners[key]} and {point}: {name}; "
                                "rename one of the options")
            owners[key] = f"{point}: {name}"
    for key in given:
        if key in owners:
            continue
        wanted = [(point, name) for point, registry in built_in.items() for name, extension in registry.items()
                  if key in options_class(extension).model_fields]
        if not wanted:
            raise UserError(f"{section}.{key}: unknown key; remove it or check its spelling")
        points = sorted({point for point, _ in wanted})
        raise UserError(f"{section}.{key}: only used with " + "; ".join(
            f"{point}: " + " or ".join(n for p, n in wanted if p == point) for point in points))


def format_error(exc: ValidationError, section: str = "") -> str:
    """A pydantic error as one line that names the key (`section.` before it)."""
    err = exc.errors()[0]
    where = ".".join([section] * bool(section) + [str(p) for p in err["loc"]]) or "config"
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown key; remove it or check its spelling"
    if err["type"] == "missing":
        return f"{where}: required key is missing; add it to the config"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "value_error":
        return msg
    return f"{where}: {msg} (got {err.get('input')!r})"


def is_import_path(value: str) -> bool:
    """True for 'module:callable' (a user's own model, estimator, rule or strategy), False for a plain name."""
    module_name, sep, attr = value.partition(":")
    return bool(sep and module_name and attr)


def resolve(name: str, registry: dict, key: str):
    """A built-in by its name in `registry`, or a user's own 'module:callable' (a task, teacher kind,
    divergence, weighting rule or strategy from outside the package, configured the same way)."""
    if name in registry:
        return registry[name]
    if is_import_path(name):
        return import_callable(name, key)
    raise UserError(f"{key}: unknown '{name}'; choose one of {', '.join(registry)} or give 'module:callable'")


def import_callable(path: str, key: str):
    """Resolve 'module:callable'; a UserError that names the config key when it does not resolve."""
    if not is_import_path(path):
        raise UserError(f"{key}: '{path}' is not of the form 'module:callable' (e.g. ensemblekd.models:mlp)")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        top = module_name.split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and exc.name == top and (
                os.path.isfile(f"{top}.py") or os.path.isdir(top)):
            raise UserError(f"{key}: module '{module_name}' is in the working directory, which Python does not search "
                            "here; run with PYTHONPATH=. (Ray's processes read it too) or install it") from None
        raise UserError(f"{key}: cannot import module '{module_name}' ({exc}); check the path or install it") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: module '{module_name}' has no callable '{attr}'")
    return fn
