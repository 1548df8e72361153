"""'module:callable' strings from a config, resolved to the callable they name."""

from __future__ import annotations

import importlib

from ensemblekd.errors import UserError


def is_import_path(value: str) -> bool:
    """True for 'module:callable' (a user's own model, estimator, rule or strategy), False for a plain name."""
    module_name, sep, attr = value.partition(":")
    return bool(sep and module_name and attr)


def import_callable(path: str, key: str):
    """Resolve 'module:callable'; a UserError that names the config key when it does not resolve."""
    if not is_import_path(path):
        raise UserError(f"{key}: '{path}' is not of the form 'module:callable' (e.g. ensemblekd.models:mlp)")
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{key}: cannot import module '{module_name}' ({exc}); check the path or install it") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{key}: module '{module_name}' has no callable '{attr}'")
    return fn
