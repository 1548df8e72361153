"""The soft-target store: round trip, the manifest as the only source of truth, verification."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.store import SCHEMA_VERSION, Store, unpack
from ensemblekd.tasks import classification


def _commit(store, split, teacher, index, ids, logits, dtype="float16"):
    data, entry = classification.encode(ids, logits, dtype)
    fs.write_bytes_atomic(store.shard_uri(split, teacher, index), data)
    store.commit(split, teacher, index, {**entry, "num_classes": logits.shape[1], "dtype": dtype})


def _store(uri, n_shards=2, rows=5):
    store = Store.open(uri, create=True)
    store.set_inputs("train", [{"uri": f"in-{i}", "rows": rows, "bytes": 1, "offset": i * rows} for i in range(n_shards)])
    store.set_teacher("a", "fp-a", {"model": "m:a"})
    return store


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(dtype):
    ids = np.arange(10, 16)
    logits = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    data, entry = classification.encode(ids, logits, dtype)
    got_ids, got, _ = classification.decode(unpack(data))
    assert entry["rows"] == 6 and entry["bytes"] == len(data)
    assert got_ids.tolist() == ids.tolist() and got.dtype == np.dtype(dtype)
    assert np.allclose(got, logits, atol=1e-2 if dtype == "float16" else 0)


def test_shards_open_with_plain_pyarrow(tmp_path):
    store = _store(str(tmp_path))
    _commit(store, "train", "a", 0, np.arange(5), np.ones((5, 3), np.float32))
    table = pq.read_table(tmp_path / "train" / "a" / "part-00000.parquet")
    assert table.column_names == ["id", "logits"] and table.num_rows == 5


def test_shards_open_with_pandas_and_duckdb(tmp_path):
    import duckdb
    import pandas as pd

    store = _store(str(tmp_path))
    _commit(store, "train", "a", 0, np.arange(5), np.arange(15, dtype=np.float32).reshape(5, 3))
    path = tmp_path / "train" / "a" / "part-00000.parquet"
    df = pd.read_parquet(path)
    assert df["id"].tolist() == list(range(5)) and list(df["logits"][1]) == [3.0, 4.0, 5.0]
    rows = duckdb.sql(f"select id, logits[3] from '{tmp_path}/train/*/part-*.parquet' order by id").fetchall()
    assert rows == [(i, 3.0 * i + 2) for i in range(5)]


def test_manifest_lists_only_committed_shards_and_survives_reopen(tmp_path):
    store = _store(str(tmp_path))
    _commit(store, "train", "a", 0, np.arange(5), np.ones((5, 3), np.float32))
    store.save()
    # a shard file that was written but never committed (crash before the manifest) is not trusted
    data, _ = classification.encode(np.arange(5, 10), np.ones((5, 3), np.float32), "float16")
    fs.write_bytes_atomic(store.shard_uri("train", "a", 1), data)
    reopened = Store.open(str(tmp_path))
    assert reopened.missing("train", "a") == [1]
    with pytest.raises(UserError, match="not committed"):
        classification.decode(reopened.read_table("train", "a", 1))
    with pytest.raises(UserError, match="1 train shard"):
        reopened.check_complete("train", ["a"])
    ids, logits, _ = classification.decode(reopened.read_table("train", "a", 0))
    assert ids.tolist() == list(range(5)) and logits.shape == (5, 3)


def test_commit_log_holds_the_commits_between_whole_saves(tmp_path):
    """save(whole=False) appends only the new commits, as one small object; a reader (or a run
    resumed after a crash) sees them; a whole save folds them into the manifest and deletes them."""
    store = _store(str(tmp_path), n_shards=4)
    store.save()
    manifest = (tmp_path / "manifest.json").read_bytes()
    for i in range(2):
        _commit(store, "train", "a", i, np.arange(5), np.full((5, 3), i, np.float32))
    store.save(whole=False)
    store.save(whole=False)  # nothing new: nothing written
    _commit(store, "train", "a", 2, np.arange(5), np.ones((5, 3), np.float32))
    store.save(whole=False)
    assert (tmp_path / "manifest.json").read_bytes() == manifest  # not rewritten
    assert sorted(p.name for p in (tmp_path / "_commits").iterdir()) == ["00000001.json", "00000002.json"]
    assert len(json.loads((tmp_path / "_commits" / "00000002.json").read_text())["commits"]) == 1

    reader = Store.open(str(tmp_path))
    assert reader.missing("train", "a") == [3] and reader.num_classes == 3 and reader.manifest["dtype"] == "float16"
    assert reader.entry("train", "a", 1) == store.entry("train", "a", 1)
    assert all(ok for *_, ok, _ in reader.verify())

    _commit(reader, "train", "a", 3, np.arange(5), np.ones((5, 3), np.float32))  # the resumed run goes on
    reader.save(whole=False)
    assert (tmp_path / "_commits" / "00000003.json").exists()
    reader.save()
    assert not list((tmp_path / "_commits").iterdir())
    assert json.loads((tmp_path / "manifest.json").read_text())["log_seq"] == 3
    assert Store.open(str(tmp_path)).missing("train", "a") == []


def test_commit_log_objects_already_in_the_manifest_are_not_replayed(tmp_path):
    """A run stopped between writing the manifest whole and deleting the log objects it folded in:
    those are skipped (their seq is at most the manifest's log_seq) and deleted by the next save."""
    store = _store(str(tmp_path))
    store.save()
    _commit(store, "train", "a", 0, np.arange(5), np.ones((5, 3), np.float32))
    store.save(whole=False)
    kept = (tmp_path / "_commits" / "00000001.json").read_bytes()
    store.forget_corrupt()
    del store.manifest["shards"]["train"]["a"]["0"]  # forgotten after the log object was written
    store.save()
    (tmp_path / "_commits").mkdir(exist_ok=True)
    (tmp_path / "_commits" / "00000001.json").write_bytes(kept)
    reopened = Store.open(str(tmp_path))
    assert reopened.missing("train", "a") == [0, 1]
    reopened.save()
    assert not list((tmp_path / "_commits").iterdir())


def test_a_commit_log_object_that_is_not_json_is_one_line(tmp_path):
    store = _store(str(tmp_path))
    store.save()
    (tmp_path / "_commits").mkdir()
    (tmp_path / "_commits" / "00000001.json").write_text('{"seq": 1, "commits": [[')
    with pytest.raises(UserError, match=r"00000001.json: a commit-log object that is not valid JSON; restore or delete"):
        Store.open(str(tmp_path))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x" / "part.parquet"

    class Boom(Exception):
        pass

    real_replace = fs.os.replace
    monkeypatch.setattr(fs.os, "replace", lambda *a: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        fs.write_bytes_atomic(str(target), b"data")
    assert not target.exists()  # only a temporary sibling, never the final name
    monkeypatch.setattr(fs.os, "replace", real_replace)
    fs.write_bytes_atomic(str(target), b"data")
    assert target.read_bytes() == b"data"


def test_verify_names_corrupt_and_truncated_shards(tmp_path):
    store = _store(str(tmp_path), n_shards=3)
    for i in range(3):
        _commit(store, "train", "a", i, np.arange(5) + 5 * i, np.ones((5, 3), np.float32) * i)
    store.save()
    flipped = tmp_path / "train" / "a" / "part-00001.parquet"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    truncated = tmp_path / "train" / "a" / "part-00002.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    result = {(i, ok, why) for _, _, i, ok, why in Store.open(str(tmp_path)).verify()}
    assert (0, True, "ok") in result and (1, False, "checksum mismatch") in result
    assert any(i == 2 and not ok and "bytes" in why for i, ok, why in result)
    with pytest.raises(UserError, match="checksum mismatch.*--repair"):
        classification.decode(store.read_table("train", "a", 1))


def test_changed_input_shard_forgets_its_label_shards(tmp_path):
    store = _store(str(tmp_path))
    for i in range(2):
        _commit(store, "train", "a", i, np.arange(5), np.ones((5, 3), np.float32))
    inputs = store.inputs("train")
    store.set_inputs("train", [inputs[0], {**inputs[1], "bytes": 999}])
    assert store.missing("train", "a") == [1]


def test_changed_fingerprint_forgets_the_teachers_shards(tmp_path):
    store = _store(str(tmp_path))
    store.set_teacher("b", "fp-b", {"model": "m:b"})
    for t in ("a", "b"):
        for i in range(2):
            _commit(store, "train", t, i, np.arange(5), np.ones((5, 3), np.float32))
    assert store.set_teacher("a", "fp-a", {"model": "m:a"}) is False
    assert store.set_teacher("a", "fp-a2", {"model": "m:a"}) is True
    assert store.missing("train", "a") == [0, 1] and store.missing("train", "b") == []


def test_teachers_with_different_class_counts_are_refused(tmp_path):
    store = _store(str(tmp_path))
    store.set_teacher("b", "fp-b", {})
    _commit(store, "train", "a", 0, np.arange(5), np.ones((5, 3), np.float32))
    with pytest.raises(UserError, match="teacher 'b' outputs 4 classes but the store holds 3"):
        _commit(store, "train", "b", 0, np.arange(5), np.ones((5, 4), np.float32))


@pytest.mark.parametrize("counts,configured,fragment", [
    ({"a": 10, "b": 10, "nine": 9}, ["a", "b", "nine"], r"teacher 'nine' outputs 9 classes, the other teachers \(a, b\) 10"),
    ({"a": 10, "nine": 9}, ["a", "nine"], r"disagree on the number of classes \('a' 10, 'nine' 9\)"),
])
def test_the_teacher_that_differs_is_named(tmp_path, counts, configured, fragment):
    store = _store(str(tmp_path))
    with pytest.raises(UserError, match=fragment):
        store.agree_classes(counts, configured)


def test_a_recorded_teacher_counts_and_a_stale_one_is_forgotten(tmp_path):
    store = _store(str(tmp_path))
    _commit(store, "train", "a", 0, np.arange(5), np.ones((5, 9), np.float32))  # 'a' holds 9 classes
    with pytest.raises(UserError, match="teacher 'a' outputs 9 classes"):   # still configured: it counts
        store.agree_classes({"b": 10, "c": 10}, ["a", "b", "c"])
    assert store.agree_classes({"b": 10}, ["b"]) == ["a"]                    # no longer configured: forgotten
    assert store.num_classes == 10 and "a" not in store.manifest["teachers"] and store.missing("train", "a") == [0, 1]


def test_same_input_ignores_the_path_but_not_the_footer():
    from ensemblekd.store import same_input

    old = {"uri": "/a/p.parquet", "rows": 5, "bytes": 100, "offset": 0, "footer": "f1"}
    assert same_input(old, {**old, "uri": "/moved/p.parquet"})
    assert not same_input(old, {**old, "footer": "f2"}) and not same_input(old, {**old, "bytes": 101})
    assert same_input({k: v for k, v in old.items() if k != "footer"}, old)  # a manifest from before footers


@pytest.mark.parametrize("content,fragment", [
    ([], "a JSON list, not an object"),
    (None, "a JSON NoneType"),
    ({"schema_version": 1}, "task: field required"),
    ({"schema_version": "1", "task": None, "num_classes": None, "dtype": None, "inputs": {}, "teachers": {},
      "shards": {}}, "schema_version: input should be a valid integer, got '1'"),
    ({"schema_version": 1, "task": None, "num_classes": None, "dtype": None, "inputs": {}, "teachers": {},
      "shards": {"train": {"a": {"0": {"rows": 5, "bytes": 9}}}}}, "shards.train.a.0.sha256: field required"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line(tmp_path, content, fragment):
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(UserError, match="manifest.json: not a store manifest") as err:
        Store.open(str(tmp_path))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_other_schema_version_and_missing_store(tmp_path):
    with pytest.raises(UserError, match="run 'ensemblekd label"):
        Store.open(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match="schema version"):
        Store.open(str(tmp_path))


def test_store_on_an_fsspec_memory_filesystem():
    store = _store("memory://ekd-test/store")
    _commit(store, "train", "a", 0, np.arange(5), np.full((5, 2), 3.0, np.float32))
    store.save()
    again = Store.open("memory://ekd-test/store")
    assert classification.decode(again.read_table("train", "a", 0)).logits[0].tolist() == [3.0, 3.0]
    assert all(ok for *_, ok, _ in again.verify())
