"""Built-in data sets, written as sharded train/val/test Parquet so the project runs with nothing
downloaded: scikit-learn's tabular sets (task classification), a synthetic language (`markov`, task
token), CPython's pydoc topics as real text (`pydoc`, task token: written by data.text.prepare_pydoc
with the shared tokenizer) and the standard library's docstrings labelled by Library Reference
chapter (`docstrings`, task text: data.docstrings, split by module).

`DATASETS` maps each name to the task it is for; `data.prepare` names one, and `prepare_for_config`
writes it where the config's split paths point, when it is missing.

The synthetic language (`markov_corpus`) is a fixed random sparse Markov chain over a
Zipf-distributed vocabulary: models fitted on it predict peaked next-token distributions, as real
LMs do (most of the mass in a few dozen tokens), which is what compressed top-k soft targets rely
on: at V = 512 a tiny GPT-2 fitted for seconds keeps about 0.97 of its mass in its top 32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from ensemblekd.errors import UserError
from ensemblekd.io import fs

SKLEARN_SETS = ("digits", "breast_cancer", "wine", "iris")
DATASETS = {**{name: "classification" for name in SKLEARN_SETS}, "markov": "token", "pydoc": "token",
            "docstrings": "text"}  # name -> task
NEEDS_TOKENIZER = ("pydoc",)  # real text: written by data.text.prepare_pydoc with the shared tokenizer


def prepare(name: str, out: str, shard_rows: int = 256, seed: int = 0, vocab_size: int | None = None) -> dict[str, str]:
    """Write the built-in data set `name` as out/{train,val,test}/part-NNNNN.parquet."""
    if name not in DATASETS:
        raise UserError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    if shard_rows < 1:
        raise UserError("--shard-rows must be at least 1")
    if name == "markov":
        return prepare_markov(out, shard_rows=shard_rows, **({"vocab_size": vocab_size} if vocab_size else {}))
    if name == "docstrings":
        from ensemblekd.data.docstrings import prepare_docstrings  # imports much of the standard library

        return prepare_docstrings(out, shard_rows=shard_rows, seed=seed)
    return prepare_sklearn(name, out, shard_rows, seed)


def prepared(cfg_data) -> bool:
    return all(fs.list_parquet(getattr(cfg_data, s)) for s in ("train", "val", "test"))


def prepare_for_config(cfg_data) -> None:
    """The demo path: write data.prepare's built-in set where the config expects it, when missing."""
    if cfg_data.prepare is None or prepared(cfg_data):
        return
    parents = {os.path.dirname(getattr(cfg_data, s).rstrip("/")) for s in ("train", "val", "test")}
    names = [os.path.basename(getattr(cfg_data, s).rstrip("/")) for s in ("train", "val", "test")]
    if len(parents) != 1 or names != ["train", "val", "test"]:
        raise UserError("data.prepare: the split paths must be DIR/train, DIR/val and DIR/test to be prepared")
    prepare(cfg_data.prepare, parents.pop(), vocab_size=cfg_data.vocab_size)


# -- scikit-learn's tabular sets --------------------------------------------------------------
def _load_sklearn(name: str):
    from sklearn import datasets

    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
              "wine": datasets.load_wine, "iris": datasets.load_iris}[name]
    d = loader()
    return d.data.astype(np.float32), d.target.astype(np.int64)


def prepare_sklearn(name: str, out: str, shard_rows: int = 256, seed: int = 0,
                    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict[str, str]:
    """A stratified split; features scaled with statistics of the train split only (digits: pixel / 16)."""
    from sklearn.model_selection import train_test_split

    x, y = _load_sklearn(name)
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
        split_dir = fs.join(out, split)
        for i, start in enumerate(range(0, len(idx), shard_rows)):
            part = np.sort(idx[start:start + shard_rows])
            table = pa.table({
                "id": pa.array(part),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x[part].reshape(-1), pa.float32()), x.shape[1]),
                "y": pa.array(y[part]),
            })
            fs.write_bytes_atomic(fs.join(split_dir, f"part-{i:05d}.parquet"), fs.table_to_parquet_bytes(table))
        paths[split] = split_dir
    return paths


# -- a synthetic language (task token) ---------------------------------------------------------
def _zipf(n: int, exponent: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return p / p.sum()


def markov_chain(vocab_size: int, branching: int = 8, seed: int = 0, unigram_exponent: float = 1.1,
                 successor_exponent: float = 1.5, modes: int = 2) -> dict[str, np.ndarray]:
    """The chain behind markov_corpus, deterministic by seed.

    Token frequencies follow a Zipf law over a random permutation of the ids (a few tokens are
    common, most are rare, as in text). Each token has `branching` successors drawn from that
    unigram, ranked with Zipf probabilities; the token before it picks one of `modes` rotations
    of the ranking (second-order context: a model that only sees the last token is less sure).
    """
    if vocab_size < 2 or branching < 1 or modes < 1:
        raise ValueError("markov_chain needs vocab_size >= 2, branching >= 1 and modes >= 1")
    rng = np.random.default_rng([seed, 0])
    rank_to_token = rng.permutation(vocab_size)
    unigram = _zipf(vocab_size, unigram_exponent)
    cdf = np.cumsum(unigram)
    draws = np.minimum(np.searchsorted(cdf, rng.random((vocab_size, branching))), vocab_size - 1)
    successors = rank_to_token[draws]  # duplicates (rare but for the commonest tokens) just merge
    shift = rng.integers(0, modes, vocab_size) * max(branching // modes, 1)
    return {"successors": successors.astype(np.int64), "shift": shift,
            "successor_probs": _zipf(branching, successor_exponent), "start": rank_to_token, "start_cdf": cdf}


def markov_corpus(vocab_size: int, num_sequences: int, seq_len: int, branching: int = 8, seed: int = 0,
                  sample_seed: int | None = None, **chain_kwargs) -> np.ndarray:
    """[num_sequences, seq_len] int32 token ids sampled from markov_chain(vocab_size, branching, seed).

    The chain depends on `seed` only; `sample_seed` (default: seed) draws the sequences, so
    held-out text from the same language is another sample_seed.
    """
    chain = markov_chain(vocab_size, branching, seed, **chain_kwargs)
    rng = np.random.default_rng([seed if sample_seed is None else sample_seed, 1])
    out = np.empty((num_sequences, seq_len), dtype=np.int64)
    if seq_len == 0 or num_sequences == 0:
        return out.astype(np.int32)
    start = np.minimum(np.searchsorted(chain["start_cdf"], rng.random(num_sequences)), vocab_size - 1)
    out[:, 0] = chain["start"][start]
    prev = out[:, 0]  # at t = 1 the "token before" is the first token itself
    for t in range(1, seq_len):
        cur = out[:, t - 1]
        j = (rng.choice(branching, size=num_sequences, p=chain["successor_probs"]) + chain["shift"][prev]) % branching
        out[:, t] = chain["successors"][cur, j]
        prev = cur
    return out.astype(np.int32)


def write_token_split(out_dir: str, tokens: np.ndarray | Sequence[np.ndarray], shard_rows: int = 256,
                      first_id: int = 0, doc_ids: np.ndarray | None = None, texts: Sequence[str] | None = None,
                      byte_ends: Sequence[np.ndarray] | None = None) -> list[str]:
    """Sequences as out_dir/part-NNNNN.parquet: id int64, tokens list<int32>, loss_mask list<bool>
    (and doc_id int64, the document each row was cut from, when doc_ids are given; text string and
    byte_ends list<int32>, each token's UTF-8 end in the row's text, when texts and byte_ends are).

    loss_mask[t] says whether token t is a training target (predicted from the tokens before
    it): all true but the first token, which has no context. Rows may differ in length. (In
    the token task position j predicts token j + 1, so position j counts where loss_mask[j + 1].)
    """
    if shard_rows < 1:
        raise UserError("shard_rows must be at least 1")
    rows = [np.asarray(r, dtype=np.int32).reshape(-1) for r in tokens]
    paths = []
    for i, start in enumerate(range(0, len(rows), shard_rows)):
        part = rows[start:start + shard_rows]
        lengths = np.array([len(r) for r in part], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        values = np.concatenate(part) if part else np.zeros(0, np.int32)
        mask = np.ones(len(values), dtype=bool)
        mask[offsets.to_numpy()[:-1][lengths > 0]] = False
        columns = {
            "id": pa.array(np.arange(first_id + start, first_id + start + len(part), dtype=np.int64)),
            "tokens": pa.ListArray.from_arrays(offsets, pa.array(values, pa.int32())),
            "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(mask, pa.bool_())),
        }
        if doc_ids is not None:
            columns["doc_id"] = pa.array(np.asarray(doc_ids[start:start + shard_rows], dtype=np.int64))
        if texts is not None and byte_ends is not None:
            columns["text"] = pa.array(list(texts[start:start + shard_rows]), pa.string())
            columns["byte_ends"] = pa.ListArray.from_arrays(offsets, pa.array(
                np.concatenate(byte_ends[start:start + shard_rows]).astype(np.int32), pa.int32()))
        table = pa.table(columns)
        path = fs.join(out_dir, f"part-{i:05d}.parquet")
        fs.write_bytes_atomic(path, fs.table_to_parquet_bytes(table))
        paths.append(path)
    return paths


def prepare_markov(out: str, vocab_size: int = 512, seq_len: int = 64, train: int = 2048, val: int = 256,
                   test: int = 256, shard_rows: int = 256, seed: int = 0) -> dict[str, str]:
    """The token demo's data: markov_corpus sequences as out/{train,val,test}/part-NNNNN.parquet.

    One language (chain seed), three independent samples of it; ids are unique across splits.
    """
    paths, first_id = {}, 0
    for i, (split, n) in enumerate((("train", train), ("val", val), ("test", test))):
        tokens = markov_corpus(vocab_size, n, seq_len, seed=seed, sample_seed=seed * 3 + i + 1)
        split_dir = fs.join(out, split)
        write_token_split(split_dir, tokens, shard_rows, first_id)
        paths[split] = split_dir
        first_id += n
    return paths
