"""Real text as token sequences (ensemblekd.data.text): the pydoc set split by topic, a user's own
text from JSON Lines or Parquet, document ids kept, and splits rewritten only when their source changed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ensemblekd.config import DataConfig
from ensemblekd.data.text import SOURCE_RECORD, prepare_inputs, prepare_pydoc, pydoc_documents, tokenize_documents
from ensemblekd.crosstok import boundaries
from ensemblekd.errors import UserError
from ensemblekd.lm import load_tokenizer


def _split(path):
    table = pq.read_table(sorted(path.glob("*.parquet")))
    return table.to_pydict()


def test_documents_are_cut_into_rows_that_keep_their_document(tiny_gguf):
    tok = load_tokenizer(str(tiny_gguf))
    texts = ["def f(x):\n    return x * 2\n" * 9, "short", "The for statement is used to iterate."]
    texts[2] += " Ünïcödé, 漢字 and an emoji 🙂🙂 end."
    cut = tokenize_documents(texts, [7, 8, 9], tok, seq_len=16)
    assert all(2 <= len(r) <= 16 for r in cut.tokens)
    for doc, text in zip([7, 8, 9], texts):  # a document's rows, in order, are its tokens and its text
        mine = [i for i, o in enumerate(cut.owners) if o == doc]
        whole = tok(text, add_special_tokens=False)["input_ids"]
        assert np.concatenate([cut.tokens[i] for i in mine]).tolist() == whole[:sum(len(cut.tokens[i]) for i in mine)]
        assert len(whole) - sum(len(cut.tokens[i]) for i in mine) <= 1  # only a 1-token rest is dropped
        assert text.startswith("".join(cut.texts[i] for i in mine))
        for i in mine:  # each token's byte end: the row's text up to there is what its tokens decode to
            raw = cut.texts[i].encode()
            assert len(cut.ends[i]) == len(cut.tokens[i]) and cut.ends[i][-1] == len(raw)
            real = boundaries(cut.ends[i])  # a token that ends inside a split character is no boundary
            assert real.all() == cut.texts[i].isascii()  # this vocabulary spells each non-ASCII character in bytes
            for j in np.flatnonzero(real):
                assert tok.decode(cut.tokens[i][:j + 1]).encode() == raw[:cut.ends[i][j]]
    with pytest.raises(UserError, match="at least 2"):
        tokenize_documents(texts, [1, 2, 3], tok, seq_len=1)


def test_pydoc_is_split_by_topic_and_rewritten_only_when_stale(tmp_path, tiny_gguf):
    out = tmp_path / "pydoc"
    prepare_pydoc(str(out), str(tiny_gguf), seq_len=64)
    splits = {s: _split(out / s) for s in ("train", "val", "test")}
    docs = {s: set(d["doc_id"]) for s, d in splits.items()}
    assert not (docs["train"] & docs["val"]) and not (docs["train"] & docs["test"]) and not (docs["val"] & docs["test"])
    assert set().union(*docs.values()) == set(range(len(pydoc_documents())))
    assert len(docs["train"]) > 4 * len(docs["test"]) > 0
    ids = [i for d in splits.values() for i in d["id"]]
    assert len(ids) == len(set(ids))                        # sequence ids unique across splits
    train = splits["train"]
    assert max(len(t) for t in train["tokens"]) == 64 and all(m[0] is False for m in train["loss_mask"])
    stamp = (out / "train" / "part-00000.parquet").stat().st_mtime_ns
    prepare_pydoc(str(out), str(tiny_gguf), seq_len=64)      # current: nothing rewritten
    assert (out / "train" / "part-00000.parquet").stat().st_mtime_ns == stamp
    prepare_pydoc(str(out), str(tiny_gguf), seq_len=32)      # another length: rewritten
    assert max(len(t) for t in _split(out / "train")["tokens"]) == 32
    assert json.loads((out / "train" / SOURCE_RECORD).read_text())["seq_len"] == 32


def test_a_users_text_from_jsonl_and_parquet(tmp_path, tiny_gguf):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = pydoc_documents()
    (corpus / "train.jsonl").write_text("".join(json.dumps({"text": t, "doc": 100 + i}) + "\n"
                                                for i, (_, t) in enumerate(docs[:4])))
    pd.DataFrame({"text": [docs[4][1]], "doc": [200]}).to_parquet(corpus / "val.parquet")
    (corpus / "test").mkdir()
    pd.DataFrame({"text": [docs[5][1], docs[6][1]], "doc": [300, 301]}).to_parquet(corpus / "test" / "a.parquet")
    d = DataConfig(train=str(tmp_path / "tok/train"), val=str(tmp_path / "tok/val"), test=str(tmp_path / "tok/test"),
                   features="tokens", seq_len=128, text={"train": str(corpus / "train.jsonl"),
                                                         "val": str(corpus / "val.parquet"),
                                                         "test": str(corpus / "test"), "id": "doc"})
    prepare_inputs(d, str(tiny_gguf))
    assert set(_split(tmp_path / "tok/train")["doc_id"]) == {100, 101, 102, 103}
    assert set(_split(tmp_path / "tok/test")["doc_id"]) == {300, 301}
    before = _split(tmp_path / "tok/val")["tokens"]
    pd.DataFrame({"text": [docs[8][1]], "doc": [200]}).to_parquet(corpus / "val.parquet")  # the text changed
    prepare_inputs(d, str(tiny_gguf))
    assert _split(tmp_path / "tok/val")["tokens"] != before
    d.text.column = "body"
    with pytest.raises(UserError, match=r"no column 'body'.*set data.text.column"):
        prepare_inputs(d, str(tiny_gguf))
    d.text.column = "doc"
    with pytest.raises(UserError, match="holds int64, not text"):
        prepare_inputs(d, str(tiny_gguf))
    with pytest.raises(UserError, match="real text needs the shared tokenizer"):
        prepare_inputs(d, None)
