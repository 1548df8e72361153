"""The built-in `docstrings` set (ensemblekd.data.docstrings): the standard library's docstrings
labelled by Library Reference chapter, split by module."""

import importlib
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ensemblekd.data import docstrings
from ensemblekd.data.builtin import DATASETS, prepare
from ensemblekd.data.docstrings import CHAPTERS, LABEL_NAMES_KEY, MIN_CHARS, MODULE_CHAPTERS, SPLITS
from ensemblekd.io import fs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The set written once through builtin.prepare (the dispatch `data.prepare` uses)."""
    out = tmp_path_factory.mktemp("docstrings")
    paths = prepare("docstrings", str(out), shard_rows=1024)
    return out, {split: _read(paths[split]) for split in SPLITS}


def _read(split_dir):
    files = fs.list_parquet(split_dir)
    assert files and all(f.rsplit("/", 1)[1].startswith("part-") for f in files)
    return pa.concat_tables(pq.read_table(f) for f in files)


def test_registered_for_the_text_task():
    assert DATASETS["docstrings"] == "text"


def test_table_modules_import_and_every_chapter_has_three():
    assert set(MODULE_CHAPTERS.values()) == set(CHAPTERS)
    for chapter in CHAPTERS:
        assert sum(c == chapter for c in MODULE_CHAPTERS.values()) >= 3, chapter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in MODULE_CHAPTERS:  # a typo in the table would silently lose a module otherwise
            importlib.import_module(module)


def test_schema_and_label_names(prepared):
    out, tables = prepared
    for split in SPLITS:
        for path in fs.list_parquet(str(out / split)):
            schema = pq.read_schema(path)
            assert {n: str(schema.field(n).type) for n in schema.names} == {
                "id": "int64", "text": "string", "y": "int64", "module": "string"}
            assert json.loads(schema.metadata[LABEL_NAMES_KEY]) == list(CHAPTERS)


def test_splits_are_disjoint_by_module_and_cover_every_chapter(prepared):
    _, tables = prepared
    modules = {s: set(t["module"].to_pylist()) for s, t in tables.items()}
    assert not (modules["train"] & modules["val"]) and not (modules["train"] & modules["test"])
    assert not (modules["val"] & modules["test"])
    for split, table in tables.items():
        assert set(table["y"].to_pylist()) == set(range(len(CHAPTERS))), split
        labels = zip(table["y"].to_pylist(), table["module"].to_pylist())
        assert all(CHAPTERS[y] == MODULE_CHAPTERS[m] for y, m in labels)
    sizes = {s: t.num_rows for s, t in tables.items()}
    assert 0.6 < sizes["train"] / sum(sizes.values()) < 0.8 and sizes["val"] > 0 and sizes["test"] > 0


def test_texts_ids_and_order(prepared):
    _, tables = prepared
    ids = [i for t in tables.values() for i in t["id"].to_pylist()]
    assert len(ids) == len(set(ids)) and min(ids) == 0
    texts = [x for t in tables.values() for x in t["text"].to_pylist()]
    assert len(texts) == len(set(texts)) and all(len(x) >= MIN_CHARS and x == x.strip() for x in texts)
    assert max(len(x) for x in texts) <= 600
    for table in tables.values():  # shuffled: the trainer shuffles within a shard, so a shard must mix chapters
        first = table.slice(0, 64)["y"].to_pylist()
        assert table["id"].to_pylist() != sorted(table["id"].to_pylist()) and len(set(first)) >= 6


def test_two_runs_write_identical_files(prepared, tmp_path):
    out, _ = prepared
    prepare("docstrings", str(tmp_path), shard_rows=1024)
    for split in SPLITS:
        first, second = fs.list_parquet(str(out / split)), fs.list_parquet(str(tmp_path / split))
        assert [p.rsplit("/", 1)[1] for p in first] == [p.rsplit("/", 1)[1] for p in second]
        assert all(fs.read_bytes(a) == fs.read_bytes(b) for a, b in zip(first, second))


def test_rows_are_capped_per_module_and_cut_at_words():
    rows = docstrings.docstring_rows(max_chars=80, per_module=5)
    counts = {}
    for module, _, text, _ in rows:
        counts[module] = counts.get(module, 0) + 1
        assert len(text) <= 80
    assert max(counts.values()) == 5
    assert docstrings._cut("alpha beta gamma", 12) == "alpha beta"
    assert docstrings._cut("alpha beta gamma", 11) == "alpha beta"
    assert docstrings._cut("alphabetagamma", 5) == "alpha"


def test_module_splits_give_every_chapter_a_module_per_split():
    rows = docstrings.docstring_rows()
    for seed in (0, 1):
        split_of = docstrings.module_splits(rows, seed=seed)
        for chapter in CHAPTERS:
            assert {split_of[m] for m in split_of if MODULE_CHAPTERS[m] == chapter} == set(SPLITS)
    assert docstrings.module_splits(rows, seed=1) != docstrings.module_splits(rows, seed=0)
