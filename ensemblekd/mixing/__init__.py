"""How the teachers' targets are mixed: weighting rules (mixing.rules) and strategies (mixing.strategies).

`distill.weighting` and `distill.strategy` name a built-in (WEIGHTINGS, STRATEGIES) or give any
'module:callable' in the same form, so a user's own rule or strategy needs no change to the package:
a rule gets `distill.weighting_kwargs`, a strategy `distill.strategy_kwargs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from ensemblekd.errors import UserError
from ensemblekd.losses import DIVERGENCES
from ensemblekd.mixing.rules import CAMKD, Accuracy, Entropy, Static, Uniform, WeightingRule
from ensemblekd.mixing.strategies import (Assistant, BornAgain, Parallel, RuleMaker, Sequential, Strategy,
                                         generation_names, mix)
from ensemblekd.plugins import is_import_path
from ensemblekd.plugins import resolve as resolve_name

WEIGHTINGS: dict[str, type] = {"uniform": Uniform, "static": Static, "accuracy": Accuracy, "entropy": Entropy,
                               "ca_mkd": CAMKD}
STRATEGIES: dict[str, type[Strategy]] = {"parallel": Parallel, "sequential": Sequential, "assistant": Assistant,
                                         "born_again": BornAgain}


def check_names(distill_cfg, resolve: bool = True) -> None:
    """The configured rule, strategy and divergence exist: a built-in name or 'module:callable'
    (resolved when `resolve`, which imports the user's module)."""
    for name, registry, key in ((distill_cfg.weighting, WEIGHTINGS, "distill.weighting"),
                                (distill_cfg.strategy, STRATEGIES, "distill.strategy"),
                                (distill_cfg.loss, dict.fromkeys(DIVERGENCES), "distill.loss")):
        if resolve or not is_import_path(name):
            resolve_name(name, registry, key)


def strategy_class(distill_cfg) -> type[Strategy]:
    """The configured strategy's class, for what it declares before it is built (its chain of
    levels, their role); a 'module:callable' that is not a Strategy subclass declares the defaults."""
    factory = resolve_name(distill_cfg.strategy, STRATEGIES, "distill.strategy")
    return factory if isinstance(factory, type) and issubclass(factory, Strategy) else Strategy


def rule_maker(weighting: str = "uniform", val_accuracy: dict[str, float | None] | None = None, **kwargs) -> RuleMaker:
    """names -> the rule `weighting` over those teachers. Built-ins get val_accuracy and their own
    keys (weights, gamma); every rule gets kwargs."""
    factory = resolve_name(weighting, WEIGHTINGS, "distill.weighting")
    return partial(factory, val_accuracy=val_accuracy, **kwargs)


def build_strategy(distill_cfg, teacher_names: Sequence[str], val_accuracy: dict[str, float | None] | None = None,
                   epochs: int = 1, ensemble: bool = False) -> Strategy:
    """The strategy of a `distill` config section over these teachers.

    ensemble=True: every teacher at once with the configured rule (parallel), whatever the strategy:
    the ensemble a staged run compresses, for evaluation.
    """
    d = distill_cfg
    rule_kwargs = {"weights": d.weights, "gamma": d.gamma} if d.weighting in WEIGHTINGS else {}
    make_rule = rule_maker(d.weighting, val_accuracy, **rule_kwargs, **d.weighting_kwargs)
    name = "parallel" if ensemble else d.strategy
    factory = resolve_name(name, STRATEGIES, "distill.strategy")
    kwargs = factory.config_kwargs(d) if name in STRATEGIES else dict(d.strategy_kwargs)
    strategy = factory(list(teacher_names), rule=make_rule, mix_space=d.mix_space, val_accuracy=val_accuracy,
                       epochs=epochs, **kwargs)
    if not isinstance(strategy, Strategy):
        raise UserError(f"distill.strategy: {name} returned {type(strategy).__name__}, not an ensemblekd.Strategy; "
                        "subclass ensemblekd.mixing.Strategy")
    return strategy


__all__ = ["STRATEGIES", "WEIGHTINGS", "Assistant", "BornAgain", "CAMKD", "Accuracy", "Entropy", "Parallel",
           "Sequential", "Static", "Strategy", "Uniform", "WeightingRule", "build_strategy", "check_names",
           "generation_names", "mix", "rule_maker", "strategy_class"]
