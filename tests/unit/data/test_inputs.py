"""Input data: shard listing, ids added when absent, bad columns."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ensemblekd.data.inputs import check_columns, input_shards, label_span, read_shard
from ensemblekd.errors import UserError
from ensemblekd.losses import IGNORE


def test_ids_are_added_when_absent_and_labels_may_be_missing(tmp_path):
    for i in range(2):
        pq.write_table(pa.table({"feat": pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float64())),
                                 "label": pa.array([1, None, 0])}), tmp_path / f"p{i}.parquet")
    shards = input_shards(str(tmp_path))
    ids, x, y = read_shard(shards[1], "feat", "label", "id")
    assert ids.tolist() == [3, 4, 5]          # offset of the second shard
    assert x.dtype == np.float32 and x.shape == (3, 2)
    assert y.tolist() == [1, IGNORE, 0]


def test_ragged_rows_and_a_missing_column(tmp_path):
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    with pytest.raises(UserError, match="differ in length"):
        read_shard(input_shards(str(tmp_path / "ragged.parquet"))[0], "x", None, "id")
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0]])}), tmp_path / "narrow.parquet")
    with pytest.raises(UserError, match="no column .pixels.*data.features"):
        read_shard(input_shards(str(tmp_path / "narrow.parquet"))[0], "pixels", None, "id")


def test_no_parquet_files(tmp_path):
    with pytest.raises(UserError, match="no Parquet files"):
        input_shards(str(tmp_path))


def _write(path, x, y=None, **options):
    columns = {"x": pa.array(x, pa.list_(pa.float32()))}
    if y is not None:
        columns["y"] = pa.array(y, pa.int64())
    pq.write_table(pa.table(columns), path, **options)


def test_the_footer_fingerprints_the_content(tmp_path):
    _write(tmp_path / "a.parquet", [[1.0, 2.0], [3.0, 4.0]], [0, 1])
    first = input_shards(str(tmp_path / "a.parquet"))[0]
    _write(tmp_path / "a.parquet", [[1.0, 2.0], [3.0, 5.0]], [0, 1])  # one value changed: same rows, same size
    second = input_shards(str(tmp_path / "a.parquet"))[0]
    assert (first.rows, first.bytes) == (second.rows, second.bytes) and first.footer != second.footer
    assert set(first.signature()) == {"uri", "rows", "bytes", "offset", "footer"}


def test_empty_files_are_skipped_and_not_parquet_is_one_line(tmp_path):
    _write(tmp_path / "p0.parquet", [[1.0]], [0])
    _write(tmp_path / "p1.parquet", [], [])
    skipped = []
    assert [s.rows for s in input_shards(str(tmp_path), "data.train", skipped.append)] == [1]
    assert skipped == [str(tmp_path / "p1.parquet")]
    (tmp_path / "p2.parquet").write_text("id,x\n0,1.0\n")
    with pytest.raises(UserError, match="p2.parquet: not a Parquet file; write the data as Parquet"):
        input_shards(str(tmp_path))
    (tmp_path / "only").mkdir()
    _write(tmp_path / "only" / "p.parquet", [], [])
    with pytest.raises(UserError, match="data.val: the Parquet files at .* hold no rows"):
        input_shards(str(tmp_path / "only"), "data.val")


@pytest.mark.parametrize("statistics", [True, False])
def test_label_span_from_the_footer_or_the_column(tmp_path, statistics):
    _write(tmp_path / "p.parquet", [[1.0]] * 3, [4, None, 12], write_statistics=statistics)
    shards = input_shards(str(tmp_path))
    assert label_span(shards, "y") == (4, 12)
    check_columns(shards, {"data.features": "x", "data.label": "y"})
    with pytest.raises(UserError, match="no column 'target'.*set data.label to the label column, or data.label: null"):
        check_columns(shards, {"data.label": "target"})


def test_bad_labels_and_features_are_refused_naming_the_file(tmp_path):
    _write(tmp_path / "neg.parquet", [[1.0]], [-2])
    with pytest.raises(UserError, match="neg.parquet: label column 'y' holds negative labels"):
        read_shard(input_shards(str(tmp_path / "neg.parquet"))[0], "x", "y", "id")
    _write(tmp_path / "nan.parquet", [[1.0], [float("nan")]], [0, 1])
    with pytest.raises(UserError, match=r"nan.parquet: feature column 'x' has NaN or Inf in 1 row\(s\) \(the first is row 1\)"):
        read_shard(input_shards(str(tmp_path / "nan.parquet"))[0], "x", None, "id")
    pq.write_table(pa.table({"x": pa.array([[1.0]]), "y": pa.array(["cat"])}), tmp_path / "text.parquet")
    with pytest.raises(UserError, match="label column 'y' has type string; labels must be integer"):
        read_shard(input_shards(str(tmp_path / "text.parquet"))[0], "x", "y", "id")
