"""Strategies: which teachers teach when, and their targets mixed into one distribution per row.

A strategy is built once per run by `ensemblekd.mixing.build_strategy` as
`Strategy(teacher_names, rule=make_rule, mix_space=..., val_accuracy=..., epochs=..., **options)`,
where `make_rule(names)` gives the configured weighting rule over any subset of the teachers and
`options` are the fields of the strategy's own `Options` model, read from the keys beside
`distill.strategy` (plugins.own_options).
`weights` gives the per-sample teacher weights [B, K] of a batch at an epoch; `targets` mixes the
teachers with them. `stage` and `describe` say what a staged strategy (sequential) does when;
they are None for the others. Subclass Strategy for your own (docs/strategies.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from ensemblekd.config import AssistantConfig, Config, Float, Int
from ensemblekd.errors import UserError
from ensemblekd.mixing.rules import Uniform, WeightingRule, require_accuracy
from ensemblekd.plugins import Options, import_callable, own_options

RuleMaker = Callable[[Sequence[str]], WeightingRule]


def mix(teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float, space: str = "prob") -> torch.Tensor:
    """The mixed soft target p_mix [B, C] from raw logits [B, K, C] and weights [B, K].

    prob:  p_mix = sum_k w_k softmax(z_k / T)      (default)
    logit: p_mix = softmax(sum_k w_k z_k / T)
    """
    z = teacher_logits.float()
    w = weights.unsqueeze(-1)
    if space == "prob":
        return (w * torch.softmax(z / temperature, dim=-1)).sum(dim=1)
    if space == "logit":
        return torch.softmax((w * z).sum(dim=1) / temperature, dim=-1)
    raise ValueError(f"unknown mix space '{space}'")


class Strategy:
    """The base of every strategy: subclasses implement `weights`. Token-level runs use `weights`
    alone: their loss sums per-teacher top-k terms with these weights (topk.sparse_divergence), which for forward KL has
    the gradient of the mixed target's."""

    Options: type[Options] = Options  # the keys it takes beside distill.strategy: none
    mix_space = "prob"
    level_role = "assistant"  # what the levels of a chain above the student are (stages.chain, the report)

    @classmethod
    def options(cls, cfg: Config) -> Any:
        """This strategy's options, from the keys of cfg.distill."""
        return own_options(cls, cfg.distill.extension_keys, "distill")

    @classmethod
    def check_config(cls, cfg: Config, touch: bool = True) -> None:
        """What its options must agree with in other sections (a UserError naming the key); with
        touch, also what needs the outside world (import paths). Run when the config is loaded."""

    @classmethod
    def chain_levels(cls, cfg: Config) -> list[AssistantConfig]:
        """The levels above the student, first to last, each distilled and labelled into the store
        before the next (stages.chain): none unless the strategy has a chain."""
        return []

    def weights(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, epoch: int = 0):
        """[B, K], rows summing to 1 (or less, for a teacher that does not teach this epoch)."""
        raise NotImplementedError(f"{type(self).__name__} must implement weights()")

    def targets(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, epoch: int = 0):
        """(p_mix [B, C] at temperature T, weights [B, K])."""
        w = self.weights(teacher_logits, labels, temperature, epoch)
        return mix(teacher_logits, w, temperature, self.mix_space), w

    def stage(self, epoch: int) -> int | None:
        """The stage an epoch belongs to, for a staged strategy; None otherwise."""
        return None

    def describe(self) -> str | None:
        """The plan of a staged strategy, e.g. 'a (3 ep) -> b (3 ep)' (MLflow tag ensemblekd.stages)."""
        return None


class Parallel(Strategy):
    """Every teacher at every step, mixed with a weighting rule."""

    def __init__(self, teacher_names: Sequence[str], rule: RuleMaker = Uniform, mix_space: str = "prob", **_):
        self.rule = rule(teacher_names)
        self.mix_space = mix_space

    def weights(self, teacher_logits: torch.Tensor, labels: torch.Tensor | None, temperature: float, epoch: int = 0):
        """[B, K], rows summing to 1."""
        return self.rule(teacher_logits, labels, temperature)


def _scatter(w_active: torch.Tensor, active: list[int], k: int) -> torch.Tensor:
    w = w_active.new_zeros((w_active.shape[0], k))
    w[:, active] = w_active
    return w


def split_epochs(num_stages: int, epochs: int, given: list[int] | None = None) -> list[int]:
    """Epochs per stage: as given, or `epochs` split evenly (the last stages take the remainder)."""
    if given:
        return list(given)
    base, extra = divmod(epochs, num_stages)
    return [base + (1 if s >= num_stages - extra else 0) for s in range(num_stages)]


def teacher_order(teacher_names: Sequence[str], order: str, val_accuracy: dict[str, float | None] | None) -> list[int]:
    """Indices of the teachers in stage order: config order, or by validation accuracy."""
    idx = list(range(len(teacher_names)))
    if order == "config":
        return idx
    by_name = require_accuracy(val_accuracy, teacher_names, f"order '{order}'")
    acc = [by_name[teacher_names[i]] for i in idx]
    return sorted(idx, key=lambda i: acc[i], reverse=(order == "descending_accuracy"))


class Sequential(Strategy):
    """One teacher per stage (or, cumulative, the teachers so far), each for a stage of epochs.

    The student, its optimizer state and the DeepSpeed engine simply carry on from stage to stage:
    only the targets change. Within a stage the weighting rule runs over the active teachers.
    """

    class Options(Options):
        order: Literal["config", "ascending_accuracy", "descending_accuracy"] = "config"
        cumulative: bool = Field(default=False, description="stage s uses the first s + 1 teachers")
        stage_epochs: list[Int] | None = Field(default=None, description="epochs per stage; default: split evenly")

    def __init__(self, teacher_names: Sequence[str], rule: RuleMaker = Uniform, mix_space: str = "prob",
                 order: str = "config", cumulative: bool = False, epochs: int = 1,
                 stage_epochs: list[int] | None = None, val_accuracy=None, **_):
        self.k, self.mix_space = len(teacher_names), mix_space
        self.order = teacher_order(teacher_names, order, val_accuracy)
        self.active = [self.order[: s + 1] if cumulative else [self.order[s]] for s in range(self.k)]
        self.rules = [rule([teacher_names[i] for i in act]) for act in self.active]
        self.ends = torch.tensor(split_epochs(self.k, epochs, stage_epochs)).cumsum(0).tolist()
        self.names = list(teacher_names)

    @classmethod
    def check_config(cls, cfg: Config, touch: bool = True) -> None:
        given, teachers, epochs = cls.options(cfg).stage_epochs, len(cfg.teachers), cfg.trainer.epochs
        if given is not None and (len(given) != teachers or sum(given) != epochs or min(given) < 1):
            raise UserError(f"distill.stage_epochs: needs one positive entry per teacher ({teachers}) "
                            f"summing to trainer.epochs ({epochs}), got {given}")
        if epochs < teachers:
            raise UserError(f"trainer.epochs: sequential needs at least one epoch per teacher ({teachers})")

    def stage(self, epoch: int) -> int:
        return next((s for s, end in enumerate(self.ends) if epoch < end), self.k - 1)

    def describe(self) -> str:
        """e.g. 'a (3 ep) -> a+b (3 ep)': what MLflow shows as the ensemblekd.stages tag."""
        starts = [0, *self.ends[:-1]]
        return " -> ".join("+".join(self.names[i] for i in act) + f" ({end - start} ep)"
                           for act, start, end in zip(self.active, starts, self.ends))

    def weights(self, teacher_logits, labels, temperature, epoch: int = 0):
        s = self.stage(epoch)
        active = self.active[s]
        return _scatter(self.rules[s](teacher_logits[:, active], labels, temperature), active, self.k)


class Assistant(Strategy):
    """TAKD (Mirzadeh et al. 2020), one level of the chain: the targets come from the assistant
    of the level above, blended with a share `ensemble_blend` (beta) of the ensemble:

        p = beta * p_ensemble + (1 - beta) * p_assistant

    With no assistant among the teachers (the first level: the ensemble teaches), this is parallel.
    """

    class Options(Options):
        assistants: list[AssistantConfig] = Field(default_factory=list, description="largest first, down to the "
                                                  "student")
        ensemble_blend: Float = Field(default=0.0, ge=0, le=1, description="share of the ensemble kept at every "
                                      "level")

    def __init__(self, teacher_names: Sequence[str], rule: RuleMaker = Uniform, mix_space: str = "prob",
                 assistants: Sequence[AssistantConfig] = (), ensemble_blend: float = 0.0, **_):
        self._blend(teacher_names, rule, mix_space, [a.name for a in assistants], ensemble_blend)

    def _blend(self, teacher_names: Sequence[str], rule: RuleMaker, mix_space: str, assistant_names: Sequence[str],
               ensemble_blend: float) -> None:
        self.k, self.mix_space, self.beta = len(teacher_names), mix_space, ensemble_blend
        found = [i for i, n in enumerate(teacher_names) if n in set(assistant_names)]
        if len(found) > 1:
            raise ValueError(f"one assistant per level, got {[teacher_names[i] for i in found]}")
        self.assistant = found[0] if found else None
        self.ensemble = [i for i in range(self.k) if i != self.assistant]
        names = [teacher_names[i] for i in self.ensemble]
        self.rule = rule(names) if names else None
        if self.rule is None:
            self.beta = 0.0  # only the assistant is there to teach

    @classmethod
    def chain_levels(cls, cfg: Config) -> list[AssistantConfig]:
        """distill.assistants, largest first."""
        return list(cls.options(cfg).assistants)

    @classmethod
    def check_config(cls, cfg: Config, touch: bool = True) -> None:
        levels, teachers = cls.chain_levels(cfg), {t.name for t in cfg.teachers}
        for a in levels:
            if a.name in teachers or [x.name for x in levels].count(a.name) > 1:
                raise UserError(f"distill.assistants: the name '{a.name}' is taken; give each assistant a unique name")
            if cfg.distill.feature_terms and not a.feature:
                raise UserError("distill.assistants: with feature terms each assistant needs a feature (a module "
                                "name), as it becomes a teacher")
        if touch:
            for i, a in enumerate(levels):
                import_callable(a.model, f"distill.assistants.{i}.model")

    def weights(self, teacher_logits, labels, temperature, epoch: int = 0):
        w = teacher_logits.new_zeros((teacher_logits.shape[0], self.k), dtype=torch.float32)
        if self.rule is not None:
            share = 1.0 if self.assistant is None else self.beta
            w = _scatter(self.rule(teacher_logits[:, self.ensemble], labels, temperature), self.ensemble, self.k) * share
        if self.assistant is not None:
            w[:, self.assistant] = 1.0 - self.beta
        return w


def generation_names(generations: int) -> list[str]:
    """born_again: the generations before the last (the student), first to last: gen1, gen2, ..."""
    return [f"gen{g}" for g in range(1, generations)]


class BornAgain(Assistant):
    """Born-again networks (Furlanello et al. 2018): a chain of generations, each of the student's
    architecture. Generation 1 learns from the ensemble (parallel, with the weighting rule);
    generation g + 1 from generation g, blended with a share `ensemble_blend` (beta) of the
    ensemble exactly as Assistant blends a TAKD level:

        p = beta * p_ensemble + (1 - beta) * p_generation_g
    """

    level_role = "generation"

    class Options(Options):
        generations: Int = Field(default=1, validate_default=True, description="students distilled one after "
                                 "another, each of the student's architecture and taught by the one before (the "
                                 "first by the ensemble), the last the student")
        ensemble_blend: Float = Field(default=0.0, ge=0, le=1, description="share of the ensemble kept at every "
                                      "level")

        @field_validator("generations")
        @classmethod
        def _two_or_more(cls, generations: int) -> int:
            if generations < 2:
                raise PydanticCustomError("generations", "born_again needs 2 or more (one generation is strategy: "
                                          "parallel)")
            return generations

    def __init__(self, teacher_names: Sequence[str], rule: RuleMaker = Uniform, mix_space: str = "prob",
                 generations: int = 2, ensemble_blend: float = 0.0, **_):
        self._blend(teacher_names, rule, mix_space, generation_names(generations), ensemble_blend)

    @classmethod
    def check_config(cls, cfg: Config, touch: bool = True) -> None:
        cls.chain_levels(cfg)

    @classmethod
    def chain_levels(cls, cfg: Config) -> list[AssistantConfig]:
        """The earlier generations (gen1, gen2, ...): each the student's model and kwargs with the
        default label actors."""
        names = generation_names(cls.options(cfg).generations)
        taken = [n for n in names if n in {t.name for t in cfg.teachers}]
        if taken:
            raise UserError(f"distill.generations: the earlier generations are named {', '.join(names)}, and "
                            f"{', '.join(taken)} is already a teacher's name; rename that teacher")
        s = cfg.student
        assert s.model is not None  # the config sets it, or student.init does
        return [AssistantConfig(name=n, model=s.model, kwargs=s.kwargs, feature=s.feature) for n in names]
