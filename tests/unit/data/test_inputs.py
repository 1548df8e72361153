"""Input data: shard listing, ids added when absent, bad columns."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ensemblekd.data.inputs import input_shards, read_shard
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


def test_wrong_feature_width_and_ragged_rows(tmp_path):
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0], [3.0]])}), tmp_path / "ragged.parquet")
    with pytest.raises(UserError, match="differ in length"):
        read_shard(input_shards(str(tmp_path / "ragged.parquet"))[0], "x", None, "id")
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0]])}), tmp_path / "narrow.parquet")
    with pytest.raises(UserError, match="width 2, the model expects 64"):
        read_shard(input_shards(str(tmp_path / "narrow.parquet"))[0], "x", None, "id", in_features=64)
    with pytest.raises(UserError, match="no feature column 'pixels'"):
        read_shard(input_shards(str(tmp_path / "narrow.parquet"))[0], "pixels", None, "id")


def test_no_parquet_files(tmp_path):
    with pytest.raises(UserError, match="no Parquet files"):
        input_shards(str(tmp_path))
