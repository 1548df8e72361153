"""Config loading: every mistake is a one-line UserError before any work starts."""

from pathlib import Path

import pytest

from conftest import REPO
from ensemblekd import UserError, load_config
from ensemblekd.testing import tiny_config, write_config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path):
    cfg = load_config(path)
    assert cfg.teachers and cfg.student.model


def _error(tmp_path, digits_dir, overrides=(), **sections) -> str:
    path = write_config(tmp_path, tiny_config(tmp_path, digits_dir, **sections))
    with pytest.raises(UserError) as exc:
        load_config(path, list(overrides))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_valid_tiny_config_loads(tmp_path, digits_dir):
    cfg = load_config(write_config(tmp_path, tiny_config(tmp_path, digits_dir)))
    assert [t.name for t in cfg.teachers] == ["mlp_a", "mlp_b"]
    assert cfg.store.dtype == "float16"


def test_unknown_key_is_named(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, trainer={"epochz": 3})
    assert "trainer.epochz" in msg and "unknown key" in msg


def test_unknown_section_is_named(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, overrides=["trainr.epochs=3"])
    assert "trainr" in msg


def test_wrong_type_is_named(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, trainer={"epochs": "many"})
    assert "trainer.epochs" in msg and "integer" in msg


def test_unresolvable_model_path(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, student={"model": "ensemblekd.models:nope"})
    assert "student.model" in msg and "nope" in msg
    msg = _error(tmp_path, digits_dir, student={"model": "no_such_package.mod:fn"})
    assert "cannot import" in msg


def test_missing_data_file(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, data={"val": str(tmp_path / "nowhere")})
    assert "data.val" in msg and "does not exist" in msg


def test_duplicate_teacher_name(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir)
    cfg["teachers"][1]["name"] = "mlp_a"
    with pytest.raises(UserError, match="'mlp_a' is used twice"):
        load_config(write_config(tmp_path, cfg))


def test_teacher_without_checkpoint_or_fit(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir)
    del cfg["teachers"][0]["fit"]
    with pytest.raises(UserError, match="teachers.0.checkpoint"):
        load_config(write_config(tmp_path, cfg))


def test_static_weights_must_name_every_teacher(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, distill={"weighting": "static", "weights": {"mlp_a": 1.0}})
    assert "distill.weights" in msg


def test_unknown_weighting(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, distill={"weighting": "magic"})
    assert "distill.weighting" in msg and "uniform" in msg


def test_batch_must_split_over_workers(tmp_path, digits_dir):
    msg = _error(tmp_path, digits_dir, trainer={"batch_size": 63, "num_workers": 2})
    assert "trainer.batch_size" in msg


def test_zero_3_in_process_is_refused(tmp_path, digits_dir):
    """ZeRO-3 patches torch's linear for the life of the process: not in the driver's own."""
    msg = _error(tmp_path, digits_dir, trainer={"num_workers": 0, "zero_stage": 3})
    assert "trainer.zero_stage" in msg and "num_workers 0" in msg


def test_overrides_reach_any_key(tmp_path, digits_dir):
    path = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    cfg = load_config(path, ["trainer.epochs=3", "teachers.1.num_cpus=0.25", "distill.temperature=2",
                             "trainer.deepspeed={zero_optimization: {stage: 2}}"])
    assert cfg.trainer.epochs == 3 and cfg.teachers[1].num_cpus == 0.25 and cfg.distill.temperature == 2.0
    assert cfg.trainer.deepspeed == {"zero_optimization": {"stage": 2}}


def test_bad_override_syntax(tmp_path, digits_dir):
    path = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    with pytest.raises(UserError, match="key.path=value"):
        load_config(path, ["trainer.epochs"])
    with pytest.raises(UserError, match="not an index"):
        load_config(path, ["teachers.5.name=x"])


def test_relative_paths_become_absolute(tmp_path, digits_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, digits_dir, store={"uri": "rel/store"})
    loaded = load_config(write_config(tmp_path, cfg))
    assert loaded.store.uri == str(tmp_path / "rel" / "store")


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("key", ["trainer.epochs", "trainer.lr", "teachers.0.num_cpus", "distill.weights.mlp_a"])
def test_a_yes_no_value_is_not_a_number(tmp_path, digits_dir, key):
    path = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    extra = ["distill.weighting=static", "distill.weights={mlp_a: 1, mlp_b: 1}"] if key.startswith("distill") else []
    with pytest.raises(UserError, match=rf"{key}: expected a number, not a yes/no value \(got True\)"):
        load_config(path, [*extra, f"{key}=true"], check=False)
    assert load_config(path, [*extra, f"{key}=1"], check=False)  # a number still is one


def test_every_config_error_names_the_file(tmp_path, digits_dir):
    path = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    with pytest.raises(UserError, match=rf"^{path}: teachers.0.model: cannot import module 'nowhere'"):
        load_config(path, ["teachers.0.model=nowhere:mlp"])


@pytest.mark.parametrize("section, message", [
    ({"evaluate": {"prompts": ["Once"]}}, "evaluate.prompts: only used with task: token; remove it"),
    ({"evaluate": {"latency_tokens": 8}}, "evaluate.latency_tokens: only used with task: token; remove it"),
    ({"evaluate": {"repeats": -1}}, "evaluate.repeats: Input should be greater than or equal to 0"),
    ({"store": {"codec": "ranked"}}, "store.codec: only used with task: token; remove it"),
    ({"distill": {"uld_weight": 0.0}}, "distill.uld_weight: only used with task: token; remove it"),
])
def test_evaluate_keys_are_checked(tmp_path, digits_dir, section, message):
    assert message in _error(tmp_path, digits_dir, **section)


def _token_error(tmp_path, data: dict) -> str:
    raw = {"task": "token", "data": {"train": str(tmp_path), "val": str(tmp_path), "test": str(tmp_path),
                                     "features": "tokens", "vocab_size": 512, **data},
           "teachers": [{"name": "t", "model": "ensemblekd.lm:tiny_gpt2", "kwargs": {"vocab_size": 512}, "fit": {}}],
           "store": {"uri": str(tmp_path / "store")}, "student": {"model": "ensemblekd.lm:tiny_gpt2"}}
    with pytest.raises(UserError) as exc:
        load_config(raw, check=False)
    return str(exc.value)


def test_real_text_needs_a_tokenizer_and_one_source(tmp_path):
    assert _token_error(tmp_path, {"prepare": "pydoc"}) == (
        "data.tokenizer: data.prepare: pydoc is real text and needs the shared tokenizer; give a tokenizer directory, "
        "a .gguf file or 'teachers'")
    text = {"train": "a.jsonl", "val": "b.jsonl", "test": "c.jsonl"}
    assert "data.text is real text and needs the shared tokenizer" in _token_error(tmp_path, {"text": text})
    assert _token_error(tmp_path, {"text": text, "prepare": "markov", "tokenizer": str(tmp_path)}) == (
        "data.prepare: data.text already says where the splits come from; remove one of them")
    assert "data.seq_len: Input should be greater than or equal to 2" in _token_error(tmp_path, {"seq_len": 1})


@pytest.mark.parametrize("overrides, message", [
    (["distill.jsd_beta=0.3"], "distill.jsd_beta: only used with loss: jsd"),
    (["distill.loss=tvd", "distill.skew_alpha=0.2"], "distill.skew_alpha: only used with loss: skew_kl or skew_reverse_kl"),
    (["distill.loss=hellinger"], "distill.loss: Input should be 'forward_kl', 'reverse_kl', 'jsd', 'tvd', 'skew_kl', "
                                 "'skew_reverse_kl' or 'module:callable'"),
    (["distill.loss=jsd", "distill.jsd_beta=1"], "distill.jsd_beta: Input should be less than 1"),
    (["distill.strategy=born_again"], "distill.generations: born_again needs 2 or more (one generation is strategy: "
                                      "parallel)"),
    (["distill.generations=3"], "distill.generations: only used with strategy: born_again"),
    (["distill.ensemble_blend=0.5"], "distill.ensemble_blend: only used with strategy: assistant or born_again"),
    (["distill.gamma=2"], "distill.gamma: only used with weighting: accuracy"),
    (["distill.weighting=accuracy", "distill.gamma=-1"], "distill.gamma: Input should be greater than or equal to 0"),
    (["distill.weighting=static"], "distill.weights: required key is missing"),
    (["distill.strategy=sequential", "distill.order=random"], "distill.order: Input should be 'config', "
                                                              "'ascending_accuracy' or 'descending_accuracy'"),
    (["distill.stage_epochs=[4, 4]"], "distill.stage_epochs: only used with strategy: sequential"),
    (["distill.strategy=sequential", "distill.stage_epochs=[4, 3]"], "distill.stage_epochs: needs one positive "
                                                                     "entry per teacher (2) summing to trainer.epochs"),
    (["distill.temprature=2"], "distill.temprature: unknown key; remove it or check its spelling"),
    (["teachers.1.trusted=[a.B]"], "teachers.1.trusted: only used with kind: sklearn"),
    (["teachers.0.prepare=smollm2"], "teachers.0.prepare: only used with kind: huggingface or gguf"),
    (["teachers.0.checkpiont=x.pt"], "teachers.0.checkpiont: unknown key; remove it or check its spelling"),
    (["distill.weighting_kwargs={gamma: 2}"], "distill.weighting_kwargs: a rule's or strategy's own keys now sit in "
                                              "distill beside its name"),
    (["store.feature_dim=8"], "store.feature_dim: no teacher stores features; give teachers a feature or remove it"),
    (["distill.hint_weight=1", "teachers.0.feature=1", "student.feature=1"],
     "teachers: distill.hint_weight/rkd_* learn from every teacher's features, and ['mlp_b'] give none; set their "
     "feature (a module name) or set the weights to 0"),
    (["distill.rkd_angle_weight=1", "teachers.0.feature=1", "teachers.1.feature=3"],
     "student.feature: distill.hint_weight/rkd_* need the student's feature module; name it"),
])
def test_the_distillation_familys_keys_are_checked(tmp_path, digits_dir, overrides, message):
    assert message in _error(tmp_path, digits_dir, overrides=overrides)


def test_a_born_again_run_and_feature_terms_validate(tmp_path, digits_dir):
    path = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    cfg = load_config(path, ["distill.strategy=born_again", "distill.generations=3", "distill.ensemble_blend=0.25",
                             "distill.loss=skew_reverse_kl", "distill.skew_alpha=0.2", "teachers.0.feature=1",
                             "teachers.1.feature=3", "student.feature=1", "store.feature_dim=8",
                             "distill.rkd_distance_weight=1"])
    assert cfg.distill.feature_terms and cfg.distill.generations == 3 and cfg.distill.skew_alpha == 0.2


def test_the_chosen_extensions_keys_are_recorded_with_their_defaults(tmp_path, digits_dir):
    """What MLflow logs and config.yaml keeps (cfg.to_dict()) holds every key the run used."""
    path = write_config(tmp_path, tiny_config(tmp_path, digits_dir))
    cfg = load_config(path, ["distill.strategy=sequential", "distill.weighting=accuracy", "distill.loss=jsd",
                             "distill.order=ascending_accuracy"])
    extra = {k: v for k, v in cfg.to_dict()["distill"].items() if k not in type(cfg.distill).model_fields}
    assert extra == {"order": "ascending_accuracy", "cumulative": False, "stage_epochs": None, "gamma": 1.0,
                     "jsd_beta": 0.5}
    assert load_config(cfg).to_dict() == cfg.to_dict()  # and it loads again as it is


def test_no_two_built_in_extensions_of_different_points_take_the_same_key():
    """Which extension a key of distill belongs to is unambiguous: keys are shared only by
    alternatives of one point (ensemble_blend: strategies assistant and born_again)."""
    from ensemblekd.losses import BUILT_IN_OPTIONS
    from ensemblekd.mixing import STRATEGIES, WEIGHTINGS
    from ensemblekd.config import DistillConfig
    from ensemblekd.plugins import options_class

    keys = {point: {k for ext in registry.values() for k in options_class(ext).model_fields}
            for point, registry in (("strategy", STRATEGIES), ("weighting", WEIGHTINGS), ("loss", BUILT_IN_OPTIONS))}
    points = list(keys)
    for i, a in enumerate(points):
        assert not keys[a] & set(DistillConfig.model_fields), a
        for b in points[i + 1:]:
            assert not keys[a] & keys[b], (a, b)
    assert keys["strategy"] >= {"order", "assistants", "generations", "ensemble_blend"} and keys["loss"] == {
        "jsd_beta", "skew_alpha"} and keys["weighting"] == {"weights", "gamma"}


def test_features_are_for_classification_only(tmp_path):
    raw = {"task": "token", "data": {"train": str(tmp_path), "val": str(tmp_path), "test": str(tmp_path),
                                     "features": "tokens", "vocab_size": 512},
           "teachers": [{"name": "t", "model": "ensemblekd.lm:tiny_gpt2", "kwargs": {"vocab_size": 512}, "fit": {},
                         "feature": "transformer.ln_f"}],
           "store": {"uri": str(tmp_path / "store")}, "student": {"model": "ensemblekd.lm:tiny_gpt2"}}
    with pytest.raises(UserError, match="teachers.feature/student.feature/distill.hint_weight/rkd_\\*: features are "
                                        "stored and learnt from with task: classification only"):
        load_config(raw, check=False)


def test_student_init_builds_the_student_from_its_directory_at_a_fifth_of_the_learning_rate(tmp_path, digits_dir):
    raw = tiny_config(tmp_path, digits_dir)
    raw["student"] = {"init": {"teacher": "mlp_a", "layers": 0.5}}
    del raw["trainer"]["lr"]
    cfg = load_config(write_config(tmp_path, raw))
    assert cfg.student.model == "ensemblekd.prune:pruned_student" and cfg.trainer.lr == 6e-4
    assert cfg.student.init.path == str(Path(cfg.trainer.output_dir) / "student_init")
    assert cfg.student.kwargs["path"] == cfg.student.init.path and Path(cfg.student.init.path).is_absolute()
    raw["trainer"]["lr"] = 0.01                                  # a learning rate given is kept
    assert load_config(write_config(tmp_path, raw)).trainer.lr == 0.01
    smollm2 = load_config(REPO / "configs" / "smollm2.yaml", check=False)
    assert smollm2.student.init.teacher == "smollm2" and smollm2.trainer.lr == 6e-4


@pytest.mark.parametrize("student, expected", [
    ({"model": None}, "student.model: give the 'module:callable' that builds the student, or student.init"),
    ({"init": {"teacher": "nobody"}}, "student.init.teacher: no teacher is named 'nobody'; choose one of mlp_a, mlp_b"),
    ({"init": {"teacher": "mlp_a", "choose": "random"}}, "student.init.choose"),
])
def test_student_init_mistakes_are_named(tmp_path, digits_dir, student, expected):
    assert expected in _error(tmp_path, digits_dir, student=student)
