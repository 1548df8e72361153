"""Input shards: Parquet files with an id, a feature (or token) column and an optional label column.

`input_shards` lists a split's shards with their row counts (from the Parquet footers, no data
read); `read_shard` turns a classification shard into numpy arrays, `read_token_shard` a shard of
token sequences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.losses import IGNORE

@dataclass(frozen=True)
class InputShard:
    """One input Parquet file; `offset` is the global row index of its first row (for missing ids)."""

    uri: str
    rows: int
    bytes: int
    offset: int

    def signature(self) -> dict:
        return asdict(self)


def input_shards(uri: str) -> list[InputShard]:
    files = fs.list_parquet(uri)
    if not files:
        raise UserError(f"no Parquet files at '{uri}'; point data.train/val/test at a .parquet file or a directory of them")
    shards, offset = [], 0
    for f in files:
        filesystem, path = fs.filesystem(f)
        with filesystem.open(path, "rb") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        shards.append(InputShard(f, rows, fs.file_size(f), offset))
        offset += rows
    return shards


def features_to_numpy(column: pa.ChunkedArray | pa.Array, name: str, where: str, writable: bool = True) -> np.ndarray:
    """A (fixed-size) list<float> column as a float32 matrix [N, F]; rows must share one width.

    writable=False returns a read-only view of Arrow's buffer when it already holds float32 (no
    copy: the trainer's shuffle copies anyway, and a copy of every shard costs ~10% of a read)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not pa.types.is_list(arr.type) and not pa.types.is_fixed_size_list(arr.type) and not pa.types.is_large_list(arr.type):
        raise UserError(f"{where}: feature column '{name}' has type {arr.type}; it must be a list of floats per row")
    n = len(arr)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        width = int(lengths[0])
        if (lengths != width).any():
            raise UserError(f"{where}: rows of feature column '{name}' differ in length ({lengths.min()}..{lengths.max()})")
    values = arr.flatten().to_numpy(zero_copy_only=False)
    values = np.array(values, dtype=np.float32) if writable else values.astype(np.float32, copy=False)
    return values.reshape(n, width)


def read_shard(shard: InputShard, features: str, label: str | None, id_col: str,
               in_features: int | None = None, writable: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64 [N], x float32 [N, F], y int64 [N] with IGNORE where unlabelled); x is read-only
    unless writable (see features_to_numpy)."""
    table = fs.read_parquet(shard.uri)
    names = table.column_names
    if features not in names:
        raise UserError(f"{shard.uri}: no feature column '{features}' (columns: {names}); set data.features")
    x = features_to_numpy(table[features], features, shard.uri, writable)
    if in_features is not None and x.shape[1] != in_features:
        raise UserError(f"{shard.uri}: feature column '{features}' has width {x.shape[1]}, the model expects {in_features}")
    ids = (table[id_col].to_numpy().astype(np.int64) if id_col in names
           else np.arange(shard.offset, shard.offset + table.num_rows, dtype=np.int64))
    if label and label in names:
        col = table[label]
        y = pc.fill_null(col, IGNORE).to_numpy().astype(np.int64)
    else:
        y = np.full(table.num_rows, IGNORE, dtype=np.int64)
    return ids, x, y


def read_token_shard(shard: InputShard, d) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """task token: (ids [R], tokens [R, L] int64 right-padded with 0, lengths [R], mask [R, L] bool).

    mask[r, t] is True where token t of row r is a training target: data.loss_mask's column when
    the file has it (else every token), never the first token (nothing predicts it) nor padding.
    Right padding is safe for causal models: no real position attends to a later one.
    """
    table = fs.read_parquet(shard.uri)
    names = table.column_names
    if d.features not in names:
        raise UserError(f"{shard.uri}: no token column '{d.features}' (columns: {names}); set data.features")
    col = table[d.features].combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)) or not pa.types.is_integer(col.type.value_type):
        raise UserError(f"{shard.uri}: token column '{d.features}' has type {col.type}; it must be a list of integer ids per row")
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    if len(lengths) and lengths.min() < 2:
        raise UserError(f"{shard.uri}: a sequence in '{d.features}' has fewer than 2 tokens; drop it (nothing to predict)")
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    if len(values) and (values.min() < 0 or values.max() >= d.vocab_size):
        raise UserError(f"{shard.uri}: token ids span {values.min()}..{values.max()}, outside data.vocab_size {d.vocab_size}")
    valid = np.arange(width)[None, :] < lengths[:, None]
    tokens = np.zeros((len(lengths), width), np.int64)
    tokens[valid] = values
    mask = valid.copy()
    if d.loss_mask and d.loss_mask in names:
        given = table[d.loss_mask].combine_chunks()
        if not np.array_equal(pc.list_value_length(given).fill_null(0).to_numpy(zero_copy_only=False), lengths):
            raise UserError(f"{shard.uri}: '{d.loss_mask}' and '{d.features}' differ in length; give one flag per token")
        mask[valid] = given.flatten().to_numpy(zero_copy_only=False).astype(bool)
    mask[:, 0] = False
    ids = (table[d.id].to_numpy().astype(np.int64) if d.id in names
           else np.arange(shard.offset, shard.offset + table.num_rows, dtype=np.int64))
    return ids, tokens, lengths, mask


def read_split(uri: str, features: str, label: str | None, id_col: str):
    """A whole (small) split in memory: for fitting teachers and evaluation."""
    parts = [read_shard(s, features, label, id_col) for s in input_shards(uri)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def labelled_split(cfg_data, split: str, who: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a split's labelled rows, for fitting a teacher; a UserError if there are none."""
    _, x, y = read_split(getattr(cfg_data, split), cfg_data.features, cfg_data.label, cfg_data.id)
    keep = y >= 0
    if not keep.any():
        raise UserError(f"{who}: fit needs labels, but the {split} split has none in column '{cfg_data.label}'")
    return x[keep], y[keep]
