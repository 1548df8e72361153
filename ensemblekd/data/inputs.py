"""Input shards: Parquet files with an id, a feature (or token) column and an optional label column.

`input_shards` lists a split's shards with their row counts (from the Parquet footers, no data
read); `read_shard` turns a classification shard into numpy arrays, `read_token_shard` a shard of
token sequences.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ensemblekd.errors import UserError
from ensemblekd.io import fs
from ensemblekd.losses import IGNORE

MAGIC = b"PAR1"  # a Parquet file starts and ends with it

SIGNATURE = ("uri", "rows", "bytes", "offset", "footer")


@dataclass(frozen=True)
class InputShard:
    """One input Parquet file; `offset` is the global row index of its first row (for missing ids).

    `footer` is the sha256 of the file's Parquet footer (its schema, row groups, byte offsets and
    column statistics): with `bytes`, a content fingerprint that costs one small read, so a file
    rewritten under the same name and ids is caught without reading its data. `metadata` is the
    parsed footer (not part of the signature)."""

    uri: str
    rows: int
    bytes: int
    offset: int
    footer: str = ""
    metadata: Any = field(default=None, compare=False, repr=False)

    def signature(self) -> dict[str, Any]:
        """What the store's manifest records of the shard, and compares to see if it changed."""
        return {k: getattr(self, k) for k in SIGNATURE}

    @classmethod
    def of(cls, signature: dict[str, Any]) -> InputShard:
        return cls(**{k: signature[k] for k in SIGNATURE if k in signature})


def read_footer(uri: str) -> tuple[int, bytes, pq.FileMetaData]:
    """(file size, raw footer, parsed footer) of a Parquet file in two small reads; a UserError
    when it is not a Parquet file (a CSV, a text file, a truncated upload)."""
    filesystem, path = fs.filesystem(uri)
    with filesystem.open(path, "rb") as fh:
        size = filesystem.size(path)
        if size >= 12:
            fh.seek(size - 8)
            tail = fh.read(8)
            length = int.from_bytes(tail[:4], "little")
            if tail[4:] == MAGIC and 12 + length <= size:
                fh.seek(size - 8 - length)
                footer = fh.read(length)
                try:  # the footer alone parses: its offsets are never followed here
                    return size, footer, pq.read_metadata(pa.BufferReader(MAGIC + footer + tail))
                except (pa.ArrowException, OSError):
                    pass
    raise UserError(f"{uri}: not a Parquet file; write the data as Parquet (e.g. pandas: "
                    "pd.read_csv(path).to_parquet(out)) or point the split at a directory of .parquet files")


def input_shards(uri: str, key: str = "data", on_empty: Callable[[str], None] | None = None) -> list[InputShard]:
    """The split's non-empty Parquet files, in name order, fingerprinted from their footers (no data
    read). Files without rows (as Spark and others write) are skipped; on_empty(uri) hears of each."""
    files = fs.list_parquet(uri)
    if not files:
        raise UserError(f"{key}: no Parquet files at '{uri}'; point it at a .parquet file or a directory of them")
    shards, offset = [], 0
    for f in files:
        size, footer, metadata = read_footer(f)
        if metadata.num_rows == 0:
            if on_empty:
                on_empty(f)
            continue
        shards.append(InputShard(f, metadata.num_rows, size, offset, hashlib.sha256(footer).hexdigest()[:16], metadata))
        offset += metadata.num_rows
    if not shards:
        raise UserError(f"{key}: the Parquet files at '{uri}' hold no rows; point it at the data")
    return shards


LABEL_NAMES_KEY = b"ensemblekd.label_names"  # Parquet schema metadata: the class names, a JSON list (task text)


def check_columns(shards: list[InputShard], columns: dict[str, str | None]) -> None:
    """Every shard has each named column ({config key: column}, None: not configured), by its footer."""
    for shard in shards:
        names = (shard.metadata or read_footer(shard.uri)[2]).schema.to_arrow_schema().names
        for key, column in columns.items():
            if column and column not in names:
                raise no_column(shard.uri, column, names, key)


def no_column(uri: str, column: str, names: list[str], key: str) -> UserError:
    fix = " to the label column, or data.label: null for unlabelled data" if key == "data.label" else ""
    return UserError(f"{uri}: no column '{column}' (columns: {names}); set {key}{fix}")


def label_span(shards: list[InputShard], label: str) -> tuple[int, int] | None:
    """(smallest, largest) label over the shards, from the footers' column statistics where they
    have them (else the label column is read); None when no row has a label."""
    lows, highs = [], []
    for shard in shards:
        meta = shard.metadata or read_footer(shard.uri)[2]
        schema = meta.schema.to_arrow_schema()
        check_label_type(schema.field(label).type, label, shard.uri)
        column = schema.names.index(label)
        stats = [meta.row_group(g).column(column).statistics for g in range(meta.num_row_groups)]
        if all(s is not None and s.has_min_max and isinstance(s.min, int) for s in stats):
            lows += [s.min for s in stats]
            highs += [s.max for s in stats]
            continue
        values = fs.read_parquet(shard.uri, columns=[label])[label].drop_null()
        if len(values):
            lows.append(pc.min(values).as_py())
            highs.append(pc.max(values).as_py())
    return (min(lows), max(highs)) if lows else None


def negative_labels(uri: str, label: str, lowest: int) -> UserError:
    return UserError(f"{uri}: label column '{label}' holds negative labels ({lowest}); labels are class indices "
                     "0..C-1, null for unlabelled rows")


def check_label_type(type_: pa.DataType, label: str, where: str) -> None:
    if not pa.types.is_integer(type_) and not pa.types.is_null(type_):
        raise UserError(f"{where}: label column '{label}' has type {type_}; labels must be integer class "
                        "indices 0..C-1 (null: unlabelled)")


def features_to_numpy(column: pa.ChunkedArray | pa.Array, name: str, where: str, writable: bool = True,
                      scan: bool = True) -> np.ndarray:
    """A (fixed-size) list<float> column as a float32 matrix [N, F]; rows must share one width.

    writable=False returns a read-only view of Arrow's buffer when it already holds float32 (no
    copy: the trainer's shuffle copies anyway, and a copy of every shard costs ~10% of a read).
    scan=False skips the NaN/Inf scan (~7% of a read): for the trainer, whose inputs the label
    stage scanned and the store's signatures show unchanged since."""
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
    values = values.reshape(n, width)
    finite = np.isfinite(values).all(axis=1) if scan else None
    if finite is not None and not finite.all():
        raise UserError(f"{where}: feature column '{name}' has NaN or Inf in {int((~finite).sum())} row(s) (the first "
                        f"is row {int(np.argmin(finite))}); clean or drop those rows")
    return values


def texts_to_numpy(column: pa.ChunkedArray | pa.Array, name: str, where: str, writable: bool = True,
                   scan: bool = True) -> np.ndarray:
    """A string column as an object array [N] of str (task text); a null, empty or blank text is
    refused (a model has nothing to read in it), as is a column that does not hold strings."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise UserError(f"{where}: text column '{name}' has type {column.type}; it must hold one string per row "
                        "(set data.text_column to the text column)")
    bad = pc.or_kleene(pc.is_null(column), pc.equal(pc.utf8_trim_whitespace(column), "")).fill_null(True)
    if pc.any(bad).as_py():
        first = int(np.argmax(bad.to_numpy(zero_copy_only=False)))
        raise UserError(f"{where}: text column '{name}' has a null or empty text in {pc.sum(bad).as_py()} row(s) "
                        f"(the first is row {first}); drop or fill those rows")
    return np.array(column.to_pylist(), dtype=object)


def read_shard(shard: InputShard, features: str, label: str | None, id_col: str, writable: bool = True,
               scan: bool = True, to_inputs=features_to_numpy, key: str = "data.features"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64 [N], x [N, ...], y int64 [N] with IGNORE where unlabelled). x is the column
    `features` (config key `key`) as to_inputs reads it: by default float32 [N, F], read-only
    unless writable, and scanned for NaN/Inf unless not scan (see features_to_numpy)."""
    table = fs.read_parquet(shard.uri)
    names = table.column_names
    if features not in names:
        raise no_column(shard.uri, features, names, key)
    x = to_inputs(table[features], features, shard.uri, writable, scan)
    ids = (table[id_col].to_numpy().astype(np.int64) if id_col in names
           else np.arange(shard.offset, shard.offset + table.num_rows, dtype=np.int64))
    if label:
        if label not in names:
            raise no_column(shard.uri, label, names, "data.label")
        check_label_type(table[label].type, label, shard.uri)
        y = pc.fill_null(table[label], IGNORE).to_numpy().astype(np.int64)
        if ((y < 0) & (y != IGNORE)).any():
            raise negative_labels(shard.uri, label, int(y[(y < 0) & (y != IGNORE)].min()))
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


def read_row_text(shard: InputShard) -> tuple[list[str], np.ndarray] | None:
    """Task token: each row's text and its tokens' byte ends in it, [R, W] right-padded with 0 (the
    columns data.text writes beside the tokens); None for a split without them."""
    if not {"text", "byte_ends"} <= set(read_footer(shard.uri)[2].schema.to_arrow_schema().names):
        return None
    table = fs.read_parquet(shard.uri, columns=["text", "byte_ends"])
    ends = table["byte_ends"].combine_chunks()
    lengths = pc.list_value_length(ends).to_numpy(zero_copy_only=False).astype(np.int64)
    padded = np.zeros((len(lengths), int(lengths.max()) if len(lengths) else 0), np.int64)
    padded[np.arange(padded.shape[1])[None, :] < lengths[:, None]] = ends.flatten().to_numpy(zero_copy_only=False)
    return table["text"].to_pylist(), padded


def read_split(uri: str, features: str, label: str | None, id_col: str, to_inputs=features_to_numpy,
               key: str = "data.features"):
    """A whole (small) split in memory: for fitting teachers and evaluation."""
    parts = [read_shard(s, features, label, id_col, to_inputs=to_inputs, key=key) for s in input_shards(uri)]
    return tuple(np.concatenate(p) for p in zip(*parts))


def labelled_split(cfg_data, split: str, who: str, features: str | None = None, to_inputs=features_to_numpy,
                   key: str = "data.features") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of a split's labelled rows, for fitting a teacher; a UserError if there are none."""
    _, x, y = read_split(getattr(cfg_data, split), features or cfg_data.features, cfg_data.label, cfg_data.id,
                         to_inputs, key)
    keep = y >= 0
    if not keep.any():
        raise UserError(f"{who}: fit needs labels, but the {split} split has none in column '{cfg_data.label}'")
    return x[keep], y[keep]
