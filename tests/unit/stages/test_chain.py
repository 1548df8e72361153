"""The chain's levels without a run (stages.chain): born-again generations and TAKD assistants as one
config per level (the real chain, labelled and nested in MLflow, is tests/integration/test_born_again.py)."""

from pathlib import Path

import pytest

from ensemblekd import UserError, load_config
from ensemblekd.config import parse_config
from ensemblekd.stages.chain import assistant_teachers, level_configs, level_role
from ensemblekd.testing import tiny_config

DATA = Path("/nonexistent/digits")  # parse_config and load_config(check=False) touch no file


def _cfg(tmp_path, **distill):
    return parse_config(tiny_config(tmp_path, DATA, distill=distill))


def test_born_again_levels_are_generations_of_the_students_architecture(tmp_path):
    cfg = _cfg(tmp_path, strategy="born_again", generations=3, ensemble_blend=0.25)
    levels = level_configs(cfg)
    out = tmp_path / "out"
    assert [name for name, _ in levels] == ["gen1", "gen2", "student"]
    assert [lv.trainer.output_dir for _, lv in levels] == [
        str(out / "generations" / "gen1"), str(out / "generations" / "gen2"), str(out)]
    assert [[t.name for t in lv.teachers] for _, lv in levels] == [
        ["mlp_a", "mlp_b"], ["mlp_a", "mlp_b", "gen1"], ["mlp_a", "mlp_b", "gen2"]]
    for _, lv in levels:                                       # every generation is the student's model
        assert (lv.student.model, lv.student.kwargs) == (cfg.student.model, cfg.student.kwargs)
        assert lv.distill == cfg.distill and lv.trainer.epochs == cfg.trainer.epochs
    for (_, above), (_, below) in zip(levels, levels[1:]):     # taught by the level above's student.pt
        taught_by = below.teachers[-1]
        assert taught_by.checkpoint == str(Path(above.trainer.output_dir) / "student.pt")
        assert (taught_by.model, taught_by.kwargs, taught_by.kind) == (cfg.student.model, cfg.student.kwargs, None)
        assert (taught_by.replicas, taught_by.num_cpus, taught_by.num_gpus, taught_by.feature) == (1, 0.5, 0.0, None)
    assert [t.name for t in assistant_teachers(cfg)] == ["gen1", "gen2"]
    assert level_role(cfg) == "generation"
    assert cfg.trainer.output_dir == str(out) and [t.name for t in cfg.teachers] == ["mlp_a", "mlp_b"]  # untouched


def test_takd_assistants_keep_their_own_model_and_directory(tmp_path):
    ta = {"name": "ta", "model": "ensemblekd.models:mlp", "kwargs": {"in_features": 64, "num_classes": 10,
                                                                     "hidden": [48]}, "resources": {"big": 1.0}}
    cfg = _cfg(tmp_path, strategy="assistant", assistants=[ta])
    (_, first), (_, last) = level_configs(cfg)
    assert first.student.kwargs["hidden"] == [48] and first.trainer.output_dir == str(tmp_path / "out/assistants/ta")
    assert last.teachers[-1].resources == {"big": 1.0} and level_role(cfg) == "assistant"
    assert level_configs(_cfg(tmp_path)) == [("student", _cfg(tmp_path))]   # no chain: the config itself


def test_generations_store_the_students_feature_only_with_feature_terms(tmp_path):
    raw = tiny_config(tmp_path, DATA, distill={"strategy": "born_again", "generations": 2, "hint_weight": 1.0},
                      student={"feature": "net.0"})
    for t in raw["teachers"]:
        t["feature"] = "net.0"
    gen1 = level_configs(parse_config(raw))[1][1].teachers[-1]
    assert gen1.name == "gen1" and gen1.feature == "net.0"
    raw["distill"]["hint_weight"] = 0.0                        # no feature terms: no features to store
    assert level_configs(parse_config(raw))[1][1].teachers[-1].feature is None


@pytest.mark.parametrize("distill, key", [
    ({"strategy": "born_again"}, "distill.generations: born_again needs 2 or more"),
    ({"strategy": "parallel", "generations": 3}, "distill.generations: only used with strategy: born_again"),
    ({"strategy": "parallel", "ensemble_blend": 0.5}, "distill.ensemble_blend"),
])
def test_born_again_config_errors(tmp_path, distill, key):
    with pytest.raises(UserError, match=key) as exc:
        load_config(tiny_config(tmp_path, DATA, distill=distill), check=False)
    assert "\n" not in str(exc.value)


def test_a_generation_name_taken_by_a_teacher_is_refused_before_any_work(tmp_path):
    raw = tiny_config(tmp_path, DATA, distill={"strategy": "born_again", "generations": 3})
    raw["teachers"][1]["name"] = "gen2"
    with pytest.raises(UserError) as exc:
        load_config(raw, check=False)
    msg = str(exc.value)
    assert msg.startswith("distill.generations:") and "gen2" in msg and "\n" not in msg
