"""Strategies against a labelled store (local Ray, Ray Train + DeepSpeed, MLflow): real runs that must
equal parallel where the papers say they reduce to it, and the evaluation ensemble of a staged
strategy. A whole chain (distilled, labelled into the store, nested MLflow runs, evaluated) runs
in test_born_again.py: TAKD and born-again share it (stages.chain), and TAKD's own levels and
weights are unit-tested (tests/unit/stages/test_chain.py, tests/unit/mixing)."""


import torch


def _one_teacher(cfg, tmp_path, name, **distill):
    out = cfg.model_copy(deep=True)
    out.teachers = [t for t in out.teachers if t.name == "mlp_a"]
    out.trainer.epochs, out.trainer.output_dir = 2, str(tmp_path / name)
    for key, value in distill.items():
        setattr(out.distill, key, value)
    return out


def test_one_stage_sequential_equals_parallel(labelled, tmp_path):
    """Bit for bit, through Ray Train and DeepSpeed (the assistant strategy without an assistant is
    parallel by its weights: tests/unit/mixing/test_strategies.py)."""
    from ensemblekd.stages.chain import distill_chain

    cfg, _ = labelled
    states = {}
    for strategy in ("parallel", "sequential"):
        result = distill_chain(_one_teacher(cfg, tmp_path, strategy, strategy=strategy), None)
        states[strategy] = torch.load(result.student, weights_only=True)
    for key, value in states["parallel"].items():
        assert torch.equal(value, states["sequential"][key]), key


def test_evaluation_ensemble_is_every_teacher_even_for_sequential(labelled):
    from ensemblekd.mixing import build_strategy
    from ensemblekd.store import Store

    cfg, _ = labelled
    cfg = cfg.model_copy(deep=True)
    cfg.distill.strategy = "sequential"
    z = torch.randn(4, 2, 10)
    names = [t.name for t in cfg.teachers]
    store = Store.open(cfg.store.uri)
    strategy = build_strategy(cfg.distill, names, store.val_accuracy(names), cfg.trainer.epochs, ensemble=True)
    p, w = strategy.targets(z, None, 1.0)
    assert torch.allclose(w, torch.full((4, 2), 0.5))   # both teachers, not stage 0's one
