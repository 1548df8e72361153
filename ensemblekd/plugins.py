"""'module:callable' strings from a config, resolved to the callable they name."""

from __future__ import annotations

import importlib
import os

from ensemblekd.errors import UserError


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
