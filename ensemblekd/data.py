"""Input data: Parquet shards with an id, a feature column and an optional label column.

`prepare` writes a built-in scikit-learn data set as sharded train/val/test Parquet, so the
project runs with nothing downloaded. `input_shards` lists a split's shards with their row
counts (from the Parquet footers, no data read); `read_shard` turns one into numpy arrays.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ensemblekd import storage
from ensemblekd.errors import UserError
from ensemblekd.losses import IGNORE

BUILTIN = ("digits", "breast_cancer", "wine", "iris")
TOKEN_BUILTIN = ("markov",)  # task token: ensemblekd.lm.prepare_markov


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
    files = storage.list_parquet(uri)
    if not files:
        raise UserError(f"no Parquet files at '{uri}'; point data.train/val/test at a .parquet file or a directory of them")
    shards, offset = [], 0
    for f in files:
        fs, path = storage.filesystem(f)
        with fs.open(path, "rb") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
        shards.append(InputShard(f, rows, storage.file_size(f), offset))
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
    table = storage.read_parquet(shard.uri)
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
    table = storage.read_parquet(shard.uri)
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


def _load_builtin(name: str):
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
              "wine": datasets.load_wine, "iris": datasets.load_iris}[name]
    d = loader()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def prepare(name: str, out: str, shard_rows: int = 256, seed: int = 0,
            fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict[str, str]:
    """Write a built-in data set as out/{train,val,test}/part-NNNNN.parquet (stratified split).

    Features are scaled with statistics of the train split only (digits: pixel / 16).
    """
    if name not in BUILTIN + TOKEN_BUILTIN:
        raise UserError(f"unknown data set '{name}'; choose one of {', '.join(BUILTIN + TOKEN_BUILTIN)}")
    if shard_rows < 1:
        raise UserError("--shard-rows must be at least 1")
    if name == "markov":  # token sequences over 512 ids, for task: token
        from ensemblekd.lm import prepare_markov

        return prepare_markov(out, shard_rows=shard_rows)
    from sklearn.model_selection import train_test_split

    x, y = _load_builtin(name)
    ids = np.arange(len(y), dtype=np.int64)
    idx_train, idx_rest = train_test_split(ids, train_size=fractions[0], stratify=y, random_state=seed)
    val_share = fractions[1] / (fractions[1] + fractions[2])
    idx_val, idx_test = train_test_split(idx_rest, train_size=val_share, stratify=y[idx_rest], random_state=seed)
    if name == "digits":
        x = x / 16.0
    else:
        mean, std = x[idx_train].mean(0), x[idx_train].std(0) + 1e-6
        x = (x - mean) / std
    paths = {}
    for split, idx in (("train", idx_train), ("val", idx_val), ("test", idx_test)):
        split_dir = storage.join(out, split)
        for i, start in enumerate(range(0, len(idx), shard_rows)):
            part = np.sort(idx[start:start + shard_rows])
            table = pa.table({
                "id": pa.array(part),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x[part].reshape(-1), pa.float32()), x.shape[1]),
                "y": pa.array(y[part]),
            })
            storage.write_bytes_atomic(storage.join(split_dir, f"part-{i:05d}.parquet"),
                                       storage.table_to_parquet_bytes(table))
        paths[split] = split_dir
    return paths


def prepared(cfg_data) -> bool:
    return all(storage.list_parquet(getattr(cfg_data, s)) for s in ("train", "val", "test"))


def prepare_for_config(cfg_data) -> None:
    """The demo path: write data.prepare's built-in set where the config expects it, when missing."""
    if cfg_data.prepare is None or prepared(cfg_data):
        return
    parents = {os.path.dirname(getattr(cfg_data, s).rstrip("/")) for s in ("train", "val", "test")}
    names = [os.path.basename(getattr(cfg_data, s).rstrip("/")) for s in ("train", "val", "test")]
    if len(parents) != 1 or names != ["train", "val", "test"]:
        raise UserError("data.prepare: the split paths must be DIR/train, DIR/val and DIR/test to be prepared")
    if cfg_data.prepare == "markov":
        from ensemblekd.lm import prepare_markov

        prepare_markov(parents.pop(), vocab_size=cfg_data.vocab_size)
        return
    prepare(cfg_data.prepare, parents.pop())
