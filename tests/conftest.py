"""Shared fixtures: a tiny digits data set and a tiny config that runs the whole pipeline fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    from ensemblekd.data import prepare

    out = tmp_path_factory.mktemp("digits")
    prepare("digits", str(out), shard_rows=128)
    return out


def tiny_config(tmp_path: Path, data_dir: Path, **sections) -> dict:
    """Two small fitted teachers, a tiny student, 2 workers, everything under tmp_path."""
    cfg = {
        "data": {"train": str(data_dir / "train"), "val": str(data_dir / "val"), "test": str(data_dir / "test")},
        "teachers": [
            {"name": "mlp_a", "model": "ensemblekd.models:mlp",
             "kwargs": {"in_features": 64, "num_classes": 10, "hidden": [128]},
             "fit": {"epochs": 15, "lr": 0.003}, "checkpoint": str(tmp_path / "teachers" / "mlp_a.pt"), "num_cpus": 0.5},
            {"name": "mlp_b", "model": "ensemblekd.models:mlp",
             "kwargs": {"in_features": 64, "num_classes": 10, "hidden": [64, 64]},
             "fit": {"epochs": 15, "lr": 0.003, "seed": 1}, "checkpoint": str(tmp_path / "teachers" / "mlp_b.pt"),
             "num_cpus": 0.5},
        ],
        "store": {"uri": str(tmp_path / "store")},
        "student": {"model": "ensemblekd.models:mlp", "kwargs": {"in_features": 64, "num_classes": 10, "hidden": [32]}},
        "distill": {"temperature": 4.0, "alpha": 0.5},
        "trainer": {"num_workers": 2, "cpus_per_worker": 0.5, "epochs": 8, "batch_size": 64, "lr": 0.005,
                    "output_dir": str(tmp_path / "out")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "tests"},
        "ray": {"num_cpus": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return cfg


def write_config(tmp_path: Path, cfg: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the tests that need actors (fractional CPUs: nothing starves on 2 cores)."""
    import logging

    import ray

    tests_dir = str(Path(__file__).resolve().parent)  # so actors can import test-only models
    ray.init(address="local", num_cpus=2, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tests_dir}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def labelled(tmp_path_factory, digits_dir, ray_local):
    """A tiny config whose teachers are fitted and labelled into its store (shared, read-only)."""
    from ensemblekd.config import load_config
    from ensemblekd.pipeline import label_stage

    tmp = tmp_path_factory.mktemp("labelled")
    cfg = load_config(write_config(tmp, tiny_config(tmp, digits_dir)))
    result = label_stage(cfg, progress=False)
    return cfg, result
