"""A user's own weighting rule and strategy, given as 'module:callable' with their parameters, train
a student through the worker loop and DeepSpeed (in process: trainer.num_workers 0): the
per-teacher weights logged to MLflow are the ones the user's code chose."""

import pytest
from mlflow.tracking import MlflowClient

import ensemblekd as ekd
from ensemblekd import UserError

pytestmark = pytest.mark.integration


def run_with(labelled, tmp_path, **distill):
    cfg = labelled[0].model_copy(deep=True)
    raw = cfg.to_dict()
    raw["distill"].update(distill)
    raw["trainer"].update(epochs=2, output_dir=str(tmp_path / "out"))
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = ekd.distill(raw, progress=False)
    return result, MlflowClient(raw["tracking"]["uri"]).get_run(result.run_id).data


def test_a_user_weighting_rule_with_its_own_key_trains(labelled, tmp_path):
    result, run = run_with(labelled, tmp_path, weighting="user_rules:Favourite", favourite="mlp_b")
    assert result.metrics["val_accuracy"] > 0.3                # learnt: 10 classes, chance is 0.1
    assert result.metrics["teacher_weight.mlp_b"] == 1.0 and result.metrics["teacher_weight.mlp_a"] == 0.0
    assert run.params["distill.weighting"] == "user_rules:Favourite" and run.params["distill.favourite"] == "mlp_b"
    assert run.metrics["teacher_weight.mlp_b"] == 1.0


def test_a_user_strategy_stages_the_teachers(labelled, tmp_path):
    result, run = run_with(labelled, tmp_path, strategy="user_rules:Alternating", period=1)
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(result.run_id, "stage")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [0.0, 1.0]
    assert result.metrics["teacher_weight.mlp_b"] == 1.0       # the last epoch: stage 1, the second teacher


def test_unknown_or_broken_user_code_is_one_line(labelled, tmp_path):
    for distill, fragment in [({"weighting": "user_rules:Nope"}, "has no callable 'Nope'"),
                              ({"weighting": "magic"}, "choose one of"),
                              ({"strategy": "no_such_module:Thing"}, "cannot import module 'no_such_module'"),
                              ({"weighting": "user_rules:Favourite"}, "distill.favourite: required key is missing"),
                              ({"strategy": "user_rules:Alternating", "period": "often"}, "distill.period: Input "
                               "should be a valid integer"),
                              ({"strategy": "user_rules:Alternating", "favourite": "mlp_a"}, "distill.favourite: "
                               "unknown key"),
                              ({"strategy_kwargs": {"period": 1}}, "distill.strategy_kwargs: a rule's or strategy's own keys "
                               "now sit in distill")]:
        raw = labelled[0].to_dict()
        raw["distill"].update(distill)
        with pytest.raises(UserError) as exc:
            ekd.load_config(raw)
        assert fragment in str(exc.value) and "\n" not in str(exc.value)
