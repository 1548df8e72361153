"""Sequential and teacher-assistant strategies: pure behaviour (the real runs that must equal parallel
where the papers say they reduce to it, and a whole TAKD chain, are in
tests/integration/test_mixing_with_store.py)."""

import torch

from ensemblekd.config import AssistantConfig
from ensemblekd.mixing import Assistant, Parallel, Sequential, rule_maker
from ensemblekd.mixing.strategies import split_epochs, teacher_order

NAMES = ["a", "b", "c"]
ACC = {"a": 0.9, "b": 0.7, "c": 0.8}


def levels(*names: str) -> list[AssistantConfig]:
    return [AssistantConfig(name=n, model="ensemblekd.models:mlp") for n in names]


def test_stage_epochs_split_evenly_or_as_given():
    assert split_epochs(3, 7) == [2, 2, 3]
    assert split_epochs(2, 4, [1, 3]) == [1, 3]


def test_orders():
    assert teacher_order(NAMES, "config", None) == [0, 1, 2]
    assert teacher_order(NAMES, "ascending_accuracy", ACC) == [1, 2, 0]
    assert teacher_order(NAMES, "descending_accuracy", ACC) == [0, 2, 1]


def test_sequential_uses_one_teacher_per_stage():
    seq = Sequential(NAMES, order="ascending_accuracy", epochs=7, val_accuracy=ACC)
    z = torch.randn(4, 3, 5)
    expected_teacher = [1, 1, 2, 2, 0, 0, 0]
    for epoch, k in enumerate(expected_teacher):
        p, w = seq.targets(z, None, 2.0, epoch)
        assert torch.equal(w, torch.nn.functional.one_hot(torch.full((4,), k), 3).float())
        assert torch.allclose(p, torch.softmax(z[:, k] / 2.0, -1))
    assert seq.describe() == "b (2 ep) -> c (2 ep) -> a (3 ep)"


def test_sequential_cumulative_grows_the_set_and_applies_the_rule_within_it():
    seq = Sequential(NAMES, rule_maker("static", weights={"a": 1, "b": 1, "c": 2}), cumulative=True, epochs=3)
    z = torch.randn(2, 3, 4)
    assert torch.allclose(seq.targets(z, None, 1.0, 0)[1][0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(seq.targets(z, None, 1.0, 1)[1][0], torch.tensor([0.5, 0.5, 0.0]))
    assert torch.allclose(seq.targets(z, None, 1.0, 2)[1][0], torch.tensor([0.25, 0.25, 0.5]))


def test_assistant_blends_the_ensemble_and_reduces_to_parallel_without_one():
    z = torch.randn(3, 3, 4)
    blended = Assistant(NAMES, assistants=levels("c"), ensemble_blend=0.25)
    _, w = blended.targets(z, None, 2.0)
    assert torch.allclose(w[0], torch.tensor([0.125, 0.125, 0.75]))
    only_assistant = Assistant(NAMES, assistants=levels("c"), ensemble_blend=0.0)
    assert torch.allclose(only_assistant.targets(z, None, 2.0)[0], torch.softmax(z[:, 2] / 2.0, -1))
    first_level = Assistant(NAMES, rule_maker("entropy"), assistants=levels("x"), ensemble_blend=0.5)
    parallel = Parallel(NAMES, rule_maker("entropy"))
    assert torch.allclose(first_level.targets(z, None, 2.0)[0], parallel.targets(z, None, 2.0)[0])


def test_born_again_generation_one_is_the_rule_then_each_generation_teaches_the_next():
    from ensemblekd.config import DistillConfig
    from ensemblekd.mixing import BornAgain, build_strategy
    from ensemblekd.plugins import own_options

    d = DistillConfig(strategy="born_again", generations=3, ensemble_blend=0.25, weighting="static",
                      weights={"a": 1, "b": 1, "c": 2})
    assert dict(own_options(BornAgain, d.extension_keys, "distill")) == {"generations": 3, "ensemble_blend": 0.25}
    z = torch.randn(3, 4, 5)
    first = build_strategy(d, NAMES)                                  # generation 1: the ensemble alone
    assert isinstance(first, BornAgain)
    assert torch.allclose(first.targets(z[:, :3], None, 2.0)[1][0], torch.tensor([0.25, 0.25, 0.5]))
    for previous in ("gen1", "gen2"):                                 # generations 2 and 3 (the student)
        w = build_strategy(d, [*NAMES, previous]).targets(z, None, 2.0)[1]
        assert torch.allclose(w, torch.tensor([0.0625, 0.0625, 0.125, 0.75]).expand(3, 4))
    alone = build_strategy(d.model_copy(update={"ensemble_blend": 0.0}), [*NAMES, "gen2"])
    assert torch.allclose(alone.targets(z, None, 2.0)[0], torch.softmax(z[:, 3] / 2.0, -1))
