"""Raw text as token sequences (task token): documents tokenized with the shared tokenizer and cut
into rows of at most `seq_len` tokens, each row keeping the id of the document it came from.

A document of n tokens gives ceil(n / seq_len) rows; a row's first token has no context inside the
row, so it is not a target (loss_mask false), as in write_token_split. Rows shorter than 2 tokens
(nothing to predict) are dropped. Two sources use this: a user's own text (`data.text`: Parquet or
JSON Lines files with a text column) and the built-in `pydoc` set (CPython's pydoc topics, split
by topic so that no topic is in two splits).

Shards hold 64 rows (16k tokens at seq_len 256): a real LM labels one in about a minute on a
CPU, so the label stage's progress moves and its actors share the work. Each row also keeps its text and the UTF-8 byte end of each of its tokens in it, so that teachers
with tokenizers of their own can read the same text and be aligned with the student's tokens
(docs/cross-tokenizer.md). A split written from text records what it was made from in
`<split>/_source.json` (the layout, the sources' sha256, the tokenizer's vocabulary hash, seq_len, column); it is rewritten when any of them
changes, and the label stage then relabels the shards whose content changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json

from ensemblekd.data.builtin import prepare_for_config, write_token_split
from ensemblekd.errors import UserError
from ensemblekd.io import fs

SOURCE_RECORD = "_source.json"
LAYOUT = 2  # the split's columns; 2: each row's text and byte_ends (2026-12-07), so older splits are rewritten
TEXT_SUFFIXES = (".parquet", ".jsonl", ".json")
SPLITS = ("train", "val", "test")


class TextRows(NamedTuple):
    """Documents cut into rows of the shared tokenizer's tokens; each row keeps its document id, its
    text (the whole characters its tokens cover) and the UTF-8 byte end of each token in that text
    (crosstok.byte_ends), so a teacher with another tokenizer can read the same text and be aligned."""

    tokens: list[np.ndarray]
    owners: np.ndarray
    texts: list[str]
    ends: list[np.ndarray]


def tokenize_documents(texts: Sequence[str], doc_ids: Sequence[int] | np.ndarray, tokenizer, seq_len: int
                       ) -> TextRows:
    """Rows of at most seq_len token ids with their document, text and byte ends, documents in order.

    A row's text runs from the previous row's last whole-character boundary to its own last one, so
    the rows of a document concatenate to it (but for a dropped 1-token rest) and no text is cut
    inside a character."""
    from ensemblekd.crosstok import byte_ends

    if seq_len < 2:
        raise UserError(f"data.seq_len: must be at least 2 tokens, got {seq_len}")
    out = TextRows([], np.zeros(0, np.int64), [], [])
    if not len(texts):
        return out
    owners: list[int] = []
    encoded = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    for n, (doc, text) in enumerate(zip(doc_ids, texts)):
        ids = np.asarray(encoded["input_ids"][n], dtype=np.int32)
        ends = byte_ends(text, encoded["offset_mapping"][n])
        raw = text.encode()
        for start in range(0, len(ids), seq_len):
            piece = ids[start:start + seq_len]
            if len(piece) < 2:
                continue
            begin = int(ends[start - 1]) if start else 0
            last = int(ends[start + len(piece) - 1])
            out.tokens.append(piece)
            out.texts.append(raw[begin:last].decode())
            out.ends.append((ends[start:start + len(piece)] - begin).astype(np.int32))
            owners.append(doc)
    return out._replace(owners=np.asarray(owners, dtype=np.int64))


def text_files(uri: str, key: str) -> list[str]:
    """A text source: one file, or the sorted Parquet / JSON Lines files of a directory."""
    if not fs.exists(uri):
        raise UserError(f"{key}: '{uri}' does not exist; give a Parquet or JSON Lines file, or a directory of them")
    fsys, path = fs.filesystem(uri)
    files = [uri] if fsys.isfile(path) else sorted(p for p in fsys.ls(path, detail=False) if p.endswith(TEXT_SUFFIXES))
    if not files:
        raise UserError(f"{key}: no .parquet, .jsonl or .json files in '{uri}'")
    return files


def read_documents(files: list[str], column: str, id_column: str | None, key: str) -> tuple[list[str], np.ndarray]:
    """(texts, document ids) of every row of the files: ids from id_column, else the row's position."""
    texts: list[str] = []
    ids: list[int] = []
    for path in files:
        try:
            table = (pa_json.read_json(pa.BufferReader(fs.read_bytes(path))) if not path.endswith(".parquet")
                     else fs.read_parquet(path))
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"{path}: cannot read it as {'Parquet' if path.endswith('.parquet') else 'JSON Lines'} "
                            f"({str(exc).splitlines()[0]})") from None
        for name in (column, id_column):
            if name and name not in table.column_names:
                raise UserError(f"{path}: no column '{name}' (columns: {table.column_names}); set {key}.column "
                                "(and id) to its text column")
        values = table[column]
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
            raise UserError(f"{path}: column '{column}' holds {values.type}, not text")
        texts += [t or "" for t in values.to_pylist()]
        ids += table[id_column].to_pylist() if id_column else list(range(len(ids), len(ids) + len(values)))
    try:
        return texts, np.asarray(ids, dtype=np.int64)
    except (TypeError, ValueError):
        raise UserError(f"{key}.id: column '{id_column}' must hold integer document ids") from None


def write_text_split(out_dir: str, texts: Sequence[str], doc_ids: np.ndarray, tokenizer, seq_len: int,
                     first_id: int, record: dict, shard_rows: int = 64) -> int:
    """Tokenize, replace out_dir's shards, then write its source record. Returns the rows written."""
    rows = tokenize_documents(texts, doc_ids, tokenizer, seq_len)
    if not rows.tokens:
        raise UserError(f"{out_dir}: the text gives no sequence of 2 tokens or more")
    for old in fs.list_parquet(out_dir):
        fs.remove(old)
    write_token_split(out_dir, rows.tokens, shard_rows, first_id, doc_ids=rows.owners, texts=rows.texts,
                      byte_ends=rows.ends)
    fs.write_bytes_atomic(fs.join(out_dir, SOURCE_RECORD), json.dumps(record, sort_keys=True).encode())
    return len(rows.tokens)


def current(out_dir: str, record: dict) -> bool:
    path = fs.join(out_dir, SOURCE_RECORD)
    return fs.exists(path) and json.loads(fs.read_bytes(path)) == record and bool(fs.list_parquet(out_dir))


def prepare_inputs(d, tokenizer_path: str | None) -> None:
    """The prepare stage: data.text tokenized, or data.prepare's built-in set written, where the
    config's splits point, when missing or stale (tokenizer_path: the shared tokenizer, for text)."""
    if d.text is None and d.prepare != "pydoc":
        return prepare_for_config(d)
    if tokenizer_path is None:
        raise UserError("data.tokenizer: real text needs the shared tokenizer; give a tokenizer directory, a .gguf "
                        "file or 'teachers'")
    if d.text is not None:
        return prepare_text(d, tokenizer_path)
    prepare_pydoc({s: getattr(d, s) for s in SPLITS}, tokenizer_path, d.seq_len)


def prepare_text(d, tokenizer_path: str) -> None:
    """data.text's files tokenized into data.train/val/test, each split only when missing or stale."""
    from ensemblekd.lm import load_tokenizer, vocab_hash

    vocab = vocab_hash(tokenizer_path)

    tokenizer, first_id = None, 0
    for split in SPLITS:
        key = f"data.text.{split}"
        files = text_files(getattr(d.text, split), key)
        digest = hashlib.sha256()
        for path in files:
            digest.update(fs.read_bytes(path))
        record = {"layout": LAYOUT, "sources": digest.hexdigest(), "vocab_hash": vocab, "seq_len": d.seq_len,
                  "column": d.text.column, "id": d.text.id, "first_id": first_id}
        out = getattr(d, split)
        if not current(out, record):
            tokenizer = tokenizer or load_tokenizer(tokenizer_path)
            texts, ids = read_documents(files, d.text.column, d.text.id, "data.text")
            write_text_split(out, texts, ids, tokenizer, d.seq_len, first_id, record)
        first_id += 10 ** 9  # sequence ids unique across splits without reading the others


# -- the built-in pydoc set -------------------------------------------------------------------
def pydoc_documents() -> list[tuple[str, str]]:
    """CPython's pydoc topics (shipped with every Python: about 79 topics, 465k characters), by name."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def pydoc_splits(seed: int = 0, fractions: tuple[float, float] = (0.8, 0.1)) -> dict[str, list[int]]:
    """Topic indices per split: a seeded shuffle of the topics cut 80/10/10; no topic in two splits."""
    n = len(pydoc_documents())
    order = np.random.default_rng(seed).permutation(n)
    a, b = int(round(fractions[0] * n)), int(round((fractions[0] + fractions[1]) * n))
    return {"train": sorted(order[:a].tolist()), "val": sorted(order[a:b].tolist()), "test": sorted(order[b:].tolist())}


def prepare_pydoc(out: str | dict[str, str], tokenizer_path: str, seq_len: int = 256,
                  shard_rows: int = 64) -> dict[str, str]:
    """The pydoc topics tokenized into out/{train,val,test} (or the given split paths), each
    split rewritten only when missing or stale. Document id = the topic's index in name order."""
    from ensemblekd.lm import load_tokenizer, vocab_hash

    vocab = vocab_hash(tokenizer_path)

    docs = pydoc_documents()
    source = hashlib.sha256(json.dumps(docs).encode()).hexdigest()
    paths = out if isinstance(out, dict) else {s: fs.join(out, s) for s in SPLITS}
    tokenizer = None
    for i, (split, topics) in enumerate(pydoc_splits().items()):
        record = {"layout": LAYOUT, "sources": source, "pydoc_topics": topics, "vocab_hash": vocab, "seq_len": seq_len,
                  "shard_rows": shard_rows}
        if not current(paths[split], record):
            tokenizer = tokenizer or load_tokenizer(tokenizer_path)
            write_text_split(paths[split], [docs[t][1] for t in topics], np.asarray(topics), tokenizer, seq_len,
                             i * 10 ** 9, record, shard_rows)
    return paths
