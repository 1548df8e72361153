"""How the teachers' targets are mixed: weighting rules (mixing.rules) and strategies (mixing.strategies).

`distill.weighting` and `distill.strategy` name a built-in (WEIGHTINGS, STRATEGIES) or give any
'module:callable' in the same form, so a user's own rule or strategy needs no change to the package.
Each takes its own keys from beside its name in `distill`, as declared by its `Options` model
(plugins), and may check them against the rest of the config (`check_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.losses import BUILT_IN_OPTIONS, loss_extension
from ensemblekd.mixing.rules import CAMKD, Accuracy, Entropy, Static, Uniform, WeightingRule
from ensemblekd.mixing.strategies import (Assistant, BornAgain, Parallel, RuleMaker, Sequential, Strategy,
                                         generation_names, mix)
from ensemblekd.plugins import check_claimed, is_import_path, own_options, record_defaults
from ensemblekd.plugins import resolve as resolve_name

WEIGHTINGS: dict[str, type] = {"uniform": Uniform, "static": Static, "accuracy": Accuracy, "entropy": Entropy,
                               "ca_mkd": CAMKD}
STRATEGIES: dict[str, type[Strategy]] = {"parallel": Parallel, "sequential": Sequential, "assistant": Assistant,
                                         "born_again": BornAgain}


def check_distill(cfg: Config, touch: bool = True) -> None:
    """The configured rule, strategy and divergence exist (a built-in name or 'module:callable',
    imported only with `touch`), every other key of `distill` is one that one of them owns, their
    options are valid, and each agrees with the rest of the config (its check_config)."""
    d = cfg.distill
    for moved in ("strategy_kwargs", "weighting_kwargs"):
        if moved in d.extension_keys:
            raise UserError(f"distill.{moved}: a rule's or strategy's own keys now sit in distill beside its name, "
                            f"as its Options model declares them; move each key of {moved} up one level")
    chosen = {point: (name, registry) for point, name, registry in (
        ("strategy", d.strategy, STRATEGIES), ("weighting", d.weighting, WEIGHTINGS), ("loss", d.loss, BUILT_IN_OPTIONS))}
    if not touch and any(is_import_path(name) for name, _ in chosen.values()):
        return  # a user's extension declares its keys in its module, which is not imported without touch
    extensions = {"strategy": resolve_name(d.strategy, STRATEGIES, "distill.strategy"),
                  "weighting": resolve_name(d.weighting, WEIGHTINGS, "distill.weighting"),
                  "loss": loss_extension(d.loss)}
    check_claimed(d.extension_keys, "distill", {p: (chosen[p][0], ext) for p, ext in extensions.items()},
                  {p: registry for p, (_, registry) in chosen.items()})
    for extension in extensions.values():
        record_defaults(d, own_options(extension, d.extension_keys, "distill"))
        check = getattr(extension, "check_config", None)
        if callable(check):
            check(cfg, touch)


def strategy_class(distill_cfg) -> type[Strategy]:
    """The configured strategy's class, for what it declares before it is built (its chain of
    levels, their role); a 'module:callable' that is not a Strategy subclass declares the defaults."""
    factory = resolve_name(distill_cfg.strategy, STRATEGIES, "distill.strategy")
    return factory if isinstance(factory, type) and issubclass(factory, Strategy) else Strategy


def rule_maker(weighting: str = "uniform", val_accuracy: dict[str, float | None] | None = None,
               **options: Any) -> RuleMaker:
    """names -> the rule `weighting` over those teachers, given val_accuracy and its options."""
    factory = resolve_name(weighting, WEIGHTINGS, "distill.weighting")
    return partial(factory, val_accuracy=val_accuracy, **options)


def build_strategy(distill_cfg, teacher_names: Sequence[str], val_accuracy: dict[str, float | None] | None = None,
                   epochs: int = 1, ensemble: bool = False) -> Strategy:
    """The strategy of a `distill` config section over these teachers.

    ensemble=True: every teacher at once with the configured rule (parallel), whatever the strategy:
    the ensemble a staged run compresses, for evaluation.
    """
    d, keys = distill_cfg, distill_cfg.extension_keys
    rule = resolve_name(d.weighting, WEIGHTINGS, "distill.weighting")
    make_rule = rule_maker(d.weighting, val_accuracy, **dict(own_options(rule, keys, "distill")))
    name = "parallel" if ensemble else d.strategy
    factory = resolve_name(name, STRATEGIES, "distill.strategy")
    strategy = factory(list(teacher_names), rule=make_rule, mix_space=d.mix_space, val_accuracy=val_accuracy,
                       epochs=epochs, **dict(own_options(factory, keys, "distill")))
    if not isinstance(strategy, Strategy):
        raise UserError(f"distill.strategy: {name} returned {type(strategy).__name__}, not an ensemblekd.Strategy; "
                        "subclass ensemblekd.mixing.Strategy")
    return strategy


__all__ = ["STRATEGIES", "WEIGHTINGS", "Assistant", "BornAgain", "CAMKD", "Accuracy", "Entropy", "Parallel",
           "Sequential", "Static", "Strategy", "Uniform", "WeightingRule", "build_strategy", "check_distill",
           "generation_names", "mix", "rule_maker", "strategy_class"]
