"""The quality benchmark's specialists data set (tools/bench_quality.py): deterministic, written in
the built-in sets' Parquet layout, and its teachers are specialists (accurate on their own group's
rows, poor on the others', blind to the other groups' feature blocks)."""

import importlib.util

import numpy as np
import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "tools" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_specialist_data_is_deterministic(bq):
    x1, y1 = bq.specialist_data(seed=0, rows=600)
    x2, y2 = bq.specialist_data(seed=0, rows=600)
    x3, _ = bq.specialist_data(seed=1, rows=600)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    s = bq.SPECIALISTS
    assert x1.shape == (600, s["groups"] * s["block"]) and set(np.unique(y1)) == set(range(s["groups"] * s["per_group"]))


def test_prepare_specialists_layout(bq, tmp_path):
    bq.prepare_specialists(tmp_path, shard_rows=1000)
    ids = []
    for split in ("train", "val", "test"):
        i, x, y = bq.read_split(tmp_path / split)
        assert x.shape[1] == bq.DATASETS["specialists"][0] and (y >= 0).all()
        ids.append(i)
    assert sum(map(len, ids)) == bq.SPECIALISTS["rows"] and len(np.unique(np.concatenate(ids))) == bq.SPECIALISTS["rows"]
    _, x, _ = bq.read_split(tmp_path / "train")
    assert np.allclose(x.mean(0), 0, atol=1e-4)          # standardised with the train split's statistics


def test_each_teacher_is_a_specialist(bq, tmp_path):
    bq.prepare_specialists(tmp_path)
    _, x, y = bq.read_split(tmp_path / "train")
    _, xt, yt = bq.read_split(tmp_path / "test")
    s = bq.SPECIALISTS
    for g in (1,):  # one of the three, to keep this fast (the --quick test checks all three are specialists)
        model = bq.fit_specialist(x, y, g, epochs=15)
        w = model[0].weight.detach()
        other = [j for j in range(x.shape[1]) if not g * s["block"] <= j < (g + 1) * s["block"]]
        assert torch.count_nonzero(w[:, other]) == 0        # blind to the other groups' features
        with torch.no_grad():
            pred = model(torch.from_numpy(xt)).argmax(-1).numpy()
        own = yt // s["per_group"] == g
        assert (pred[own] == yt[own]).mean() > 0.75         # accurate on its own group
        assert (pred == yt).mean() < 0.45                   # poor overall
        assert (pred // s["per_group"] == g).all()          # it only ever answers with its own group's classes
