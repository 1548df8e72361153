"""The built-in data sets (ensemblekd.data.builtin): scikit-learn's tabular sets written as sharded,
disjoint splits, and the synthetic language and its token shards."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from ensemblekd.data.builtin import markov_chain, markov_corpus, prepare, prepare_markov, write_token_split
from ensemblekd.data.inputs import input_shards, read_split
from ensemblekd.errors import UserError

V = 512


# -- tabular sets --------------------------------------------------------------------------------
def test_prepare_digits_writes_sharded_disjoint_splits(digits_dir):
    sizes = {}
    ids = {}
    for split in ("train", "val", "test"):
        shards = input_shards(str(digits_dir / split))
        assert len(shards) >= 2 and all(s.rows <= 128 for s in shards)
        sizes[split] = sum(s.rows for s in shards)
        ids[split] = set(read_split(str(digits_dir / split), "x", "y", "id")[0].tolist())
    assert sum(sizes.values()) == 1797
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    _, x, y = read_split(str(digits_dir / "train"), "x", "y", "id")
    assert x.shape[1] == 64 and 0.0 <= x.min() and x.max() <= 1.0 and set(y.tolist()) == set(range(10))


def test_prepare_other_builtin(tmp_path):
    prepare("wine", str(tmp_path), shard_rows=50)
    _, x, y = read_split(str(tmp_path / "train"), "x", "y", "id")
    assert x.shape[1] == 13 and len(set(y.tolist())) == 3


def test_unknown_dataset(tmp_path):
    with pytest.raises(UserError, match="unknown data set"):
        prepare("mnist", str(tmp_path))


# -- the synthetic language ----------------------------------------------------------------------
def test_markov_corpus_is_deterministic_and_sparse():
    a = markov_corpus(V, 64, 32, seed=3)
    assert a.dtype == np.int32 and a.shape == (64, 32) and a.min() >= 0 and a.max() < V
    assert np.array_equal(a, markov_corpus(V, 64, 32, seed=3))
    assert not np.array_equal(a, markov_corpus(V, 64, 32, seed=4))
    b = markov_corpus(V, 64, 32, seed=3, sample_seed=9)        # same language, other text
    assert not np.array_equal(a, b)
    succ = markov_chain(V, seed=3)["successors"]
    for seqs in (a, b):                                        # every transition is one of the chain's
        assert all(nxt in succ[cur] for cur, nxt in zip(seqs[:, :-1].ravel(), seqs[:, 1:].ravel()))


def test_write_token_split_round_trips_through_pyarrow(tmp_path):
    seqs = [np.arange(5), np.arange(3) + 10, np.array([7]), np.arange(4) + 20, np.zeros(0, np.int32)]
    paths = write_token_split(str(tmp_path / "train"), seqs, shard_rows=2, first_id=100)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    table = pq.read_table(str(tmp_path / "train"))
    assert str(table.schema.field("id").type) == "int64"
    assert str(table.schema.field("tokens").type) == "list<element: int32>"
    assert str(table.schema.field("loss_mask").type) == "list<element: bool>"
    assert table["id"].to_pylist() == [100, 101, 102, 103, 104]
    assert table["tokens"].to_pylist() == [s.tolist() for s in seqs]
    assert table["loss_mask"].to_pylist() == [[False] + [True] * (len(s) - 1) if len(s) else [] for s in seqs]


def test_prepare_markov_writes_three_splits(tmp_path):
    paths = prepare_markov(str(tmp_path), vocab_size=64, seq_len=8, train=20, val=6, test=6, shard_rows=8)
    tables = {s: pq.read_table(p) for s, p in paths.items()}
    assert {s: t.num_rows for s, t in tables.items()} == {"train": 20, "val": 6, "test": 6}
    ids = np.concatenate([t["id"].to_numpy() for t in tables.values()])
    assert np.array_equal(np.sort(ids), np.arange(32))
    assert len(list((tmp_path / "train").glob("part-*.parquet"))) == 3
    assert tables["val"]["tokens"].to_pylist() != tables["test"]["tokens"].to_pylist()
