"""The Token task: what each stage asks of task token (tasks.base.Task), built on the codec, the
shared vocabulary, the batches and the served student beside it; and the served model of a student
that generates no text (next-token probabilities)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ensemblekd.config import Config
from ensemblekd.crosstok import mixed_divergence
from ensemblekd.data.inputs import InputShard, check_columns, input_shards, read_footer, read_row_text, read_token_shard
from ensemblekd.errors import UserError
from ensemblekd.lm import fit_lm, load_tokenizer, logits_of
from ensemblekd.losses import divergence
from ensemblekd.store import Store
from ensemblekd.tasks.base import Column, Served, Task, calibration_rows, read_aligned, row_batches, run_on
from ensemblekd.tasks.token.batches import (
    Sequences,
    Targets,
    TokenBatch,
    align,
    bits,
    join_batches,
    make_batch,
    model_accuracy,
    next_at,
    own_spans,
    read_token_split,
    student_positions,
    target_spans,
)
from ensemblekd.tasks.token.codec import TopK, decode, encode
from ensemblekd.tasks.token.served import generates_text, log_text_generation, save_student_hf
from ensemblekd.tasks.token.vocabulary import own_tokenizer, own_tokens, shared_vocabulary, tokenizer_path, vocabulary
from ensemblekd.teachers import kind_of
from ensemblekd.topk import dense_from_topk, rule_inputs, token_loss, topk_targets


class NextTokenProbabilities(torch.nn.Module):
    """The served student: token ids [B, L] -> softmax at T = 1 over the shared vocabulary, per position."""

    def __init__(self, student: torch.nn.Module, vocab: int):
        super().__init__()
        self.student, self.vocab = student, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_of(self.student(input_ids))[..., :self.vocab].float(), dim=-1)


VOCAB_MAP = "vocab_map"  # the store's arrays of a teacher with its own tokenizer (keep_in_store)


def vocab_map_of(store: Store, teacher: str) -> torch.Tensor:
    """A teacher's vocabulary map (Token.keep_in_store), read once per process and store entry."""
    entry = store.teacher(teacher).get(VOCAB_MAP)
    if entry is None:
        raise UserError(f"{store.uri}: teacher '{teacher}' has its own tokenizer but no vocabulary map; re-run label")
    return _read_vocab_map(store, teacher, entry["sha256"])


@functools.lru_cache(maxsize=16)
def _read_vocab_map(store: Store, teacher: str, sha256: str) -> torch.Tensor:
    found = store.arrays(teacher, VOCAB_MAP)
    assert found is not None  # vocab_map_of checked the entry
    return torch.from_numpy(found["map"].astype(np.int64))


# -- the task ------------------------------------------------------------------------------------
class Token(Task):
    name = "token"
    own_keys = ("data.text", "evaluate.prompts", "evaluate.latency_tokens", "store.codec", "distill.uld_weight")
    unit = "token"
    implicit_store_info = {"codec": "float16"}  # stores from before store.codec have only this one
    columns = (Column("ppl", "perplexity", ".2f"), Column("NLL/tok", "nll", ".3f"), Column("bits/B", "bits_per_byte", ".3f"),
               Column("bits/ch", "bits_per_char", ".3f"), Column("top-1", "accuracy", "%"),
               Column("fidelity", "fidelity", "%"), Column("KL", "kl", ".3f"), Column("tok/s", "tokens_per_s", ",.0f"))
    headline = "perplexity"

    def check_config(self, cfg: Config) -> None:
        d = cfg.data
        if d.vocab_size is None:
            raise UserError("data.vocab_size: task token needs the shared vocabulary size (e.g. 32000)")
        if cfg.distill.mix_space == "logit":
            raise UserError("distill.mix_space: task token mixes per-teacher top-k targets in probability space; "
                            "use mix_space: prob")
        if d.tokenizer == "teachers" and not any(kind_of(t).tokenizer(t) for t in cfg.teachers):
            raise UserError("data.tokenizer: 'teachers' needs pretrained teachers; give a tokenizer directory or null")
        named = next((t for t in cfg.teachers if t.name == d.tokenizer), None)
        if named is not None and not kind_of(named).tokenizer(named):
            raise UserError(f"data.tokenizer: teacher '{named.name}' has no tokenizer of its own (it is not pretrained); "
                            "name a pretrained teacher, or give a tokenizer directory")
        if (d.text is not None or d.prepare == "pydoc") and d.tokenizer is None:
            raise UserError(f"data.tokenizer: {'data.text' if d.text else 'data.prepare: pydoc'} is real text and "
                            "needs the shared tokenizer; give a tokenizer directory, a .gguf file or 'teachers'")
        if d.text is not None and d.prepare is not None:
            raise UserError("data.prepare: data.text already says where the splits come from; remove one of them")

    def tokenizer(self, cfg: Config) -> str | None:
        return tokenizer_path(cfg)

    def store_info(self, cfg: Config) -> dict[str, Any]:
        return vocabulary(cfg)

    def describe_store(self, manifest: dict[str, Any]) -> str:
        per_token = manifest.get("bytes_per_token")
        return (f"vocabulary {manifest['vocab_size']} (hash {manifest['vocab_hash']}), top-{manifest['top_k']} "
                f"{manifest.get('codec', 'float16')} + tail" + (f", {per_token:.1f} bytes/token" if per_token else ""))

    def ensemble_members(self, cfg: Config, teachers: list[str]) -> list[str]:
        """The teachers of the student's vocabulary: one with its own tokenizer has no distribution
        over the student's ids to mix, so it is compared in bits per byte alone."""
        own = {t.name for t in cfg.teachers if own_tokenizer(cfg, t)}
        return [n for n in teachers if n not in own]

    def decode(self, table: pa.Table) -> TopK:
        return decode(table)

    # -- label -------------------------------------------------------------------------------
    def read_inputs(self, cfg: Config, shard: dict[str, Any]):
        """(ids, tokens, lengths, each row's text or None): the text is read by teachers with a
        tokenizer of their own."""
        ids, tokens, lengths, _ = read_token_shard(InputShard.of(shard), cfg.data)
        text = read_row_text(InputShard.of(shard))
        return ids, tokens, lengths, None if text is None else text[0]

    @torch.inference_mode()
    def label_shard(self, model, inputs, cfg: Config, teacher, device: str, where: str):
        """The shard's targets over the shared vocabulary; a teacher with a tokenizer of its own
        (vocabulary.own_tokenizer) reads each row's text instead and stores its own tokens and
        their byte ends beside its targets (docs/cross-tokenizer.md)."""
        ids, tokens, lengths, texts = inputs
        assert cfg.data.vocab_size is not None  # check_config requires it
        vocab, extra, own = cfg.data.vocab_size, {}, None
        path = own_tokenizer(cfg, teacher)
        if path is not None:
            tokens, lengths, own = own_tokens(path, texts, teacher.name, where)
            vocab = len(load_tokenizer(path))
            extra = {"own_vocab_size": vocab}
        logp, idx, tail, nxt = self._targets(model, tokens, lengths, min(cfg.store.top_k, vocab), vocab, teacher,
                                             device, where)
        data, entry = encode(ids, lengths - 1, logp, idx, tail, level=cfg.store.compression_level, nxt=nxt,
                             codec=cfg.store.codec, own=own)
        return data, {**entry, **extra, "num_classes": cfg.data.vocab_size, "dtype": "float16"}

    @staticmethod
    def _targets(model, tokens: np.ndarray, lengths: np.ndarray, k: int, vocab: int, teacher, device: str,
                 where: str):
        """(logp, idx, tail, nxt) of every position of every row. Rows are batched by length (longest
        first), each batch cut to its own longest row, so padding costs little; each batch's logits
        are reduced to top-k at once (a [rows, L, V] block of a 49k vocabulary is 50 MB a row), and
        the rows keep the input's order. Each row's logits go to topk_targets as a view, and NaN is
        looked for in what is kept, not in the logits (a NaN or +inf logit makes every log-prob of
        its position NaN; a −inf logit is a legitimate zero): copying the batch's rows together and
        checking them took 14% of a SmolLM2 label worker's time (py-spy), and removing both took
        label from 0.80x to 1.00x a plain loop's tokens/s (tools/bench_label_lm.py)."""
        order = np.argsort(-np.asarray(lengths), kind="stable")
        per_row: list = [None] * len(tokens)
        for start in range(0, len(tokens), teacher.batch_size):
            rows = order[start:start + teacher.batch_size]
            width = int(lengths[rows].max())
            batch = torch.from_numpy(np.ascontiguousarray(tokens[rows, :width])).to(device)
            try:
                logits = logits_of(model(batch)).float()
            except (RuntimeError, IndexError) as exc:
                raise UserError(f"teacher '{teacher.name}' failed on {where} ({str(exc).splitlines()[0]}); "
                                "check data.vocab_size and the sequence length against the model") from None
            logits = shared_vocabulary(logits, vocab, f"teacher '{teacher.name}'")
            for r, row in enumerate(rows):              # a row's logits: a view on the device, not a copy
                n = lengths[row] - 1                    # position j predicts token j + 1
                per_row[row] = topk_targets(logits[r, :n], k, following=batch[r, 1:n + 1])
        logp, idx, tail, nxt = (np.concatenate(part) for part in zip(*per_row))
        if np.isnan(logp[:, 0]).any() or np.isnan(nxt).any():  # NaN or +inf logits make every log-prob NaN
            raise UserError(f"teacher '{teacher.name}' produced NaN/Inf logits on {where}; fix the teacher or "
                            "its checkpoint")
        return logp, idx, tail, nxt

    def stored_accuracy(self, cfg: Config, store: Store, split: str, teacher: str) -> float | None:
        """Top-1 next-token accuracy from the stored targets (each position's first top-k id)."""
        hits = total = 0
        for shard in range(len(store.inputs(split))):
            rows = self.read_rows(cfg, store, split, shard, [teacher])
            t = rows.targets[0]
            if t.aligned is not None:  # its own tokenizer: its top-1 against its own next tokens
                hits += int((t.idx[:, 0] == t.aligned.following).sum())
                total += len(t.idx)
                continue
            r, j = np.nonzero(rows.mask[:, 1:])
            hits += int((t.idx[t.offsets[r] + j, 0] == rows.tokens[r, j + 1]).sum())
            total += len(r)
        return hits / total if total else None

    # -- fit a teacher -------------------------------------------------------------------------
    def fit(self, model, cfg: Config, teacher) -> None:
        """Next-token cross-entropy on the train split's target tokens (lm.fit_lm)."""
        tokens, _, mask = read_token_split(cfg, cfg.data.train)
        f = teacher.fit
        fit_lm(model, tokens, epochs=f.epochs, lr=f.lr, batch_size=f.batch_size, seed=f.seed,
               weight_decay=f.weight_decay, mask=mask)

    def calibration(self, cfg: Config, rows: int, batch_size: int) -> list[torch.Tensor]:
        """Token batches, each cut to its shortest row (no padding enters the scores)."""
        tokens, lengths, _ = read_token_split(cfg, cfg.data.train)
        picked = calibration_rows(len(tokens), rows, cfg.trainer.seed)
        return [torch.from_numpy(tokens[part, :int(lengths[part].min())]).long()
                for part in (picked[i:i + batch_size] for i in range(0, len(picked), batch_size))]

    def accuracy(self, model, cfg: Config, split: str) -> float | None:
        tokens, _, mask = read_token_split(cfg, getattr(cfg.data, split))
        assert cfg.data.vocab_size is not None  # check_config requires it
        return model_accuracy(model, tokens, mask, cfg.data.vocab_size)

    # -- distill -------------------------------------------------------------------------------
    def check_inputs(self, cfg: Config, shards: list[InputShard], num_classes: int | None) -> None:
        """The token column, and each row's text and byte ends where a teacher reads the text with
        its own tokenizer (splits written from text have them)."""
        check_columns(shards, {"data.features": cfg.data.features})
        own = [t.name for t in cfg.teachers if own_tokenizer(cfg, t)]
        for shard in shards if own else []:
            names = (shard.metadata or read_footer(shard.uri)[2]).schema.to_arrow_schema().names
            if not {"text", "byte_ends"} <= set(names):
                raise UserError(f"teacher '{own[0]}': its tokenizer is not data.tokenizer, so it reads each row's "
                                f"text, and {shard.uri} has none; write the splits from text (data.text, or "
                                "data.prepare: pydoc)")

    def keep_in_store(self, cfg: Config, store: Store) -> None:
        """The vocabulary map (crosstok.vocab_map: each of its ids -> the student id of the same
        bytes, or -1) of each teacher with its own tokenizer, kept once beside its shards; a
        teacher whose fingerprint changed has lost it (Store.set_teacher) and gets it again."""
        from ensemblekd.crosstok import vocab_map

        shared = tokenizer_path(cfg)
        for t in cfg.teachers:
            path = own_tokenizer(cfg, t)
            if path is not None and store.teacher(t.name).get(VOCAB_MAP) is None:
                assert shared is not None  # own_tokenizer is None without a shared tokenizer
                mapping = vocab_map(load_tokenizer(shared), load_tokenizer(path)).astype(np.int32)
                store.set_arrays(t.name, VOCAB_MAP, {"map": mapping})

    def preflight(self, cfg: Config, store: Store, student) -> None:
        """The store holds this vocabulary; the student runs on a validation sequence and covers it."""
        store.check_task(self.name, vocabulary(cfg), self.implicit_store_info)
        _, tokens, lengths, _ = read_token_shard(InputShard.of(store.inputs("val")[0]), cfg.data)
        out = logits_of(run_on(student, torch.from_numpy(tokens[:1, :lengths[0]])))
        assert cfg.data.vocab_size is not None  # check_config requires it
        shared_vocabulary(out, cfg.data.vocab_size, "student.model")

    def read_rows(self, cfg: Config, store: Store, split: str, shard: int, teachers: list[str]) -> Sequences:
        """One input shard and its teachers' targets, aligned by id and length; a teacher with its
        own tokenizer by the byte ends of its tokens and the student's (batches.align)."""
        signature = InputShard.of(store.inputs(split)[shard])
        ids, tokens, lengths, mask = read_token_shard(signature, cfg.data)
        found = read_aligned(store, split, shard, teachers, decode, ids,
                             same=lambda t: t.own_tokens is not None or np.array_equal(t.lengths, lengths - 1))
        text, targets = None, []
        for name, t in zip(teachers, found):
            offsets = np.concatenate([[0], np.cumsum(t.lengths)])
            if t.own_tokens is None:
                targets.append(Targets(offsets, t.logp, t.idx, t.tail))
                continue
            text = text or read_row_text(signature)
            if text is None:
                raise UserError(f"{signature.uri}: teacher '{name}' read each row's text, and the split has none now; "
                                "write the splits from text again")
            targets.append(Targets(offsets, t.logp, t.idx, t.tail, align(text[1], lengths, t), vocab_map_of(store, name)))
        return Sequences(tokens, lengths, mask, targets)

    def batches(self, cfg: Config, store: Store, split: str, teachers: list[str], segments, batch_size: int,
                rng) -> Iterator[TokenBatch]:
        """Micro-batches of batch_size sequences (row_batches: a short rest carried into the next shard)."""
        for pieces in row_batches(segments, lambda s: self.read_rows(cfg, store, split, s, teachers), batch_size, rng):
            yield join_batches([(rows, data) for data, rows in pieces])

    def train_step(self, engine, batch: TokenBatch, strategy, cfg: Config, epoch: int):
        """(KDLoss, per-token teacher weights [N, K], N): the loss of one micro-batch, not yet stepped.

        With teachers of other tokenizers (batch.maps), each rule sees every teacher's buckets at its
        own next token, a teacher's weight is 0 where it is not aligned with the student and the
        weights of those that are are renormalised to 1 (none aligned: no KD term there), and the KD
        term is crosstok.mixed_divergence (docs/cross-tokenizer.md)."""
        assert cfg.data.vocab_size is not None  # check_config requires it
        vocab, dc = cfg.data.vocab_size, cfg.distill
        batch = batch.to(engine.device)
        z = student_positions(engine, batch, vocab)
        if not any(m is not None for m in batch.maps):
            buckets, bucket_labels = rule_inputs(batch.logp, batch.idx, batch.tail, batch.labels, vocab)
            weights = strategy.weights(buckets, bucket_labels, dc.temperature, epoch)
            out = token_loss(z, batch.labels, batch.logp, batch.idx, batch.tail, vocab, dc.temperature, dc.alpha,
                             weights, divergence=divergence(dc))
            return out, weights, len(batch.labels)
        sizes = [vocab if m is None else len(m) for m in batch.maps]
        buckets, bucket_labels = rule_inputs(batch.logp, batch.idx, batch.tail, batch.teacher_labels, sizes)
        weights = strategy.weights(buckets, bucket_labels, dc.temperature, epoch) * batch.present
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        out = token_loss(z, batch.labels, batch.logp, batch.idx, batch.tail, vocab, dc.temperature, dc.alpha, weights,
                         kd_term=lambda s: mixed_divergence(s, batch.logp, batch.idx, batch.tail, weights, batch.present,
                                                            batch.maps, vocab, dc.temperature, divergence(dc),
                                                            beta=dc.uld_weight))
        return out, weights, len(batch.labels)

    def count_correct(self, engine, batch: TokenBatch, cfg: Config) -> tuple[int, int]:
        batch = batch.to(engine.device)
        assert cfg.data.vocab_size is not None  # check_config requires it
        pred = student_positions(engine, batch, cfg.data.vocab_size).argmax(-1)
        return int((pred == batch.labels).sum()), len(batch.labels)

    def save_student(self, cfg: Config, student_uri: str) -> str | None:
        """A Hugging Face causal LM student is also saved with save_pretrained (weights, configs with
        the tokenizer's special ids, the shared tokenizer) in HF_STUDENT_DIR next to student.pt
        (served.save_student_hf); None for any other student."""
        return save_student_hf(cfg, student_uri)

    # -- evaluate and serve --------------------------------------------------------------------
    @torch.inference_mode()
    def quality(self, cfg: Config, store: Store, teachers: list[str], others: list[str], student, strategy):
        """Over every target token of the test split. Teachers are judged from their stored targets
        (top-1 = their first top-k id; NLL from the stored log-prob of the next token, or, in a store
        without it, from the reconstructed distribution), the ensemble is their reconstructed
        distributions (topk.dense_from_topk: the tail spread evenly) mixed with the configured rule
        at T = 1 (its NLL: the rule's mix of the exact next-token probabilities), the student is run
        here. KL is per token; ECE is not computed. Tokens are taken in chunks so that the dense
        [tokens, teachers, V] reconstruction stays near 64 MB whatever V.

        Bits per byte and per character (splits written from text): each model's NLL in bits over
        the UTF-8 bytes (characters) of the tokens it predicted. A teacher with its own tokenizer
        gets those alone, over its own positions, and stays out of the ensemble (ensemble_members)."""
        assert cfg.data.vocab_size is not None  # check_config requires it
        members = self.ensemble_members(cfg, teachers)
        own = [n for n in teachers if n not in members]
        names, vocab = [*members, *others], cfg.data.vocab_size
        # per model: correct, agrees with the ensemble, KL sum, NLL sum
        stats = torch.zeros(len(names) + 2, 4, dtype=torch.float64)
        spans = np.zeros(2)                                   # bytes, characters of the student's targets
        own_stats = {n: np.zeros(3) for n in own}             # NLL sum, bytes, characters
        total, k_ens = 0, len(members)
        chunk = max(1, (16 << 20) // (len(names) * vocab))
        for shard in range(len(store.inputs("test"))):
            rows = self.read_rows(cfg, store, "test", shard, names)
            stored_next = self._stored_next(store, shard, names)
            order = np.arange(len(rows.tokens))
            for start in range(0, len(order), 32):
                batch = make_batch(order[start:start + 32], *rows)
                if not len(batch.labels):
                    continue
                log_student = torch.log_softmax(student_positions(student, batch, vocab).float(), -1)
                picked = None if stored_next is None else next_at(stored_next, rows, order[start:start + 32])
                for a in range(0, len(batch.labels), chunk):
                    part = slice(a, a + chunk)
                    stats += self._chunk_stats(batch, part, log_student[part], None if picked is None else picked[part],
                                               names, k_ens, vocab, strategy)
                total += len(batch.labels)
            text = read_row_text(InputShard.of(store.inputs("test")[shard]))
            if text is not None:
                spans += target_spans(text, rows.lengths, rows.mask)
                for name in own:
                    stored = decode(store.read_table("test", name, shard))
                    assert stored.next is not None  # a teacher with its own tokenizer always stores it
                    own_stats[name] += [-float(stored.next.astype(np.float64).sum()), *own_spans(text[0], stored)]
        out = {}
        for m, name in enumerate([*names, "ensemble", "student"]):
            correct, agree, kl, nll = (stats[m] / max(total, 1)).tolist()
            out[name] = {"accuracy": correct, "fidelity": agree, "kl": kl, "ece": None, "nll": nll,
                         "perplexity": float(np.exp(nll)), **bits(float(stats[m, 3]), *spans)}
        for name, (nll_sum, n_bytes, n_chars) in own_stats.items():
            out[name] = {"accuracy": None, "fidelity": None, "kl": None, "ece": None, "nll": None, "perplexity": None,
                         **bits(nll_sum, n_bytes, n_chars)}
        return out, total

    def _stored_next(self, store: Store, shard: int, names: list[str]):
        """Each model's stored next-token log-probs of a test shard (offsets, values), or None if any lacks them."""
        found = [decode(store.read_table("test", name, shard)) for name in names]
        if any(t.next is None for t in found):
            return None
        return [(np.concatenate([[0], np.cumsum(t.lengths)]), t.next) for t in found]

    @staticmethod
    def _chunk_stats(batch: TokenBatch, part: slice, log_s: torch.Tensor, picked, names, k_ens: int, vocab: int,
                     strategy) -> torch.Tensor:
        labels = batch.labels[part]
        dense = torch.stack([dense_from_topk(batch.logp[part, k], batch.idx[part, k], batch.tail[part, k], vocab)
                             for k in range(len(names))], dim=1)                                     # [c, K, V]
        w = strategy.weights(*rule_inputs(batch.logp[part, :k_ens], batch.idx[part, :k_ens], batch.tail[part, :k_ens],
                                          torch.full_like(labels, -100), vocab), 1.0)
        p_ens = (w.unsqueeze(-1) * dense[:, :k_ens]).sum(1)
        log_models = [*(dense[:, k].clamp_min(1e-30).log() for k in range(len(names))), p_ens.clamp_min(1e-30).log(),
                      log_s]
        at_label = [lp.gather(-1, labels[:, None]).squeeze(-1) for lp in log_models]
        if picked is not None:  # exact: the stored log p of the next token, mixed as the ensemble mixes
            at_label[:len(names)] = list(picked.T)
            at_label[len(names)] = (w * picked[:, :k_ens].exp()).sum(-1).clamp_min(1e-30).log()
        top_ens = p_ens.argmax(-1)
        stats = torch.zeros(len(log_models), 4, dtype=torch.float64)
        for m, log_p in enumerate(log_models):
            top = log_p.argmax(-1)
            kl = (p_ens * (p_ens.clamp_min(1e-30).log() - log_p)).sum(-1)
            stats[m] = torch.tensor([(top == labels).sum().item(), (top == top_ens).sum().item(), kl.sum().item(),
                                     -at_label[m].double().sum().item()])
        return stats

    def latency_inputs(self, cfg: Config) -> tuple[torch.Tensor, str | None]:
        x = torch.from_numpy(read_token_split(cfg, cfg.data.test)[0])[:, :cfg.evaluate.latency_tokens]
        return x, f"sequences of {x.shape[1]} tokens"

    def model_inputs(self, cfg: Config, model: str, x: torch.Tensor) -> torch.Tensor:
        """A teacher with its own tokenizer: the test split's first rows of text in its tokens, cut
        to x's length (its tokens/s then counts its own tokens)."""
        teacher = next((t for t in cfg.teachers if t.name == model), None)
        path = None if teacher is None else own_tokenizer(cfg, teacher)
        text = None if path is None else read_row_text(input_shards(cfg.data.test)[0])
        if path is None or text is None:
            return x
        ids = load_tokenizer(path)(text[0][:len(x)], add_special_tokens=False)["input_ids"]
        width = min(x.shape[1], *(len(r) for r in ids))
        return torch.tensor([r[:width] for r in ids], dtype=torch.long)

    def throughput(self, x: torch.Tensor, batch: int, seconds: float) -> dict[str, float]:
        return {"tokens_per_s": batch * x.shape[1] / seconds}

    def summary(self, ensemble: dict[str, Any], student: dict[str, Any]) -> tuple[dict[str, float | None], str | None]:
        retained = ensemble["perplexity"] / student["perplexity"]
        return ({"perplexity_retained": retained},
                f"keeps {100 * retained:.1f}% of its perplexity (ensemble ppl / student ppl)")

    @torch.inference_mode()
    def continuations(self, cfg: Config, scorers) -> list[dict]:
        """Greedy: each step appends the model's most likely next token (the full prefix is run
        again: no cache, as every model here is scored the same way); stops at the tokenizer's
        end-of-sequence token. Models of the student's vocabulary only."""
        from ensemblekd.lm import load_tokenizer

        path = tokenizer_path(cfg)
        if path is None:
            return []
        tokenizer, out = load_tokenizer(path), []
        vocab, eos = cfg.data.vocab_size, tokenizer.eos_token_id
        own = {t.name for t in cfg.teachers if own_tokenizer(cfg, t)}  # no ids of the student's to continue in
        for prompt in cfg.evaluate.prompts:
            start = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            for name, score in ((n, f) for n, f in scorers.items() if n not in own):
                seq = list(start)
                for _ in range(cfg.evaluate.max_new_tokens):
                    following = int(score(torch.tensor([seq]))[0, -1, :vocab].argmax())
                    if following == eos:
                        break
                    seq.append(following)
                out.append({"prompt": prompt, "model": name, "text": tokenizer.decode(seq[len(start):])})
        return out

    def logits(self, model, x: torch.Tensor, cfg: Config) -> torch.Tensor:
        assert cfg.data.vocab_size is not None  # check_config requires it
        return shared_vocabulary(logits_of(model(x)), cfg.data.vocab_size, "teacher")

    def log_model(self, cfg: Config, student, name: str, tags: dict[str, str]) -> None:
        """A Hugging Face causal LM student with a tokenizer: MLflow's transformers flavor, a
        text-generation pipeline (texts in, generated texts out; served.log_text_generation). Any
        other student, or one without a tokenizer: next-token probabilities (served)."""
        if generates_text(cfg, student):
            log_text_generation(cfg, student, name, tags)
        else:
            super().log_model(cfg, student, name, tags)

    def served(self, cfg: Config, student) -> Served:
        """Token ids int64 [-1, -1] -> next-token probabilities float32 [-1, -1, V] at every position;
        4 validation sequences cut to a common length as the example. No TorchScript copy: a trace
        fixes the shapes of a Hugging Face LM."""
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        tokens, lengths, _ = read_token_split(cfg, cfg.data.val)
        n = min(4, len(tokens))
        example = tokens[:n, :int(lengths[:n].min())].copy()
        assert cfg.data.vocab_size is not None  # check_config requires it
        signature = ModelSignature(Schema([TensorSpec(np.dtype("int64"), (-1, -1))]),
                                   Schema([TensorSpec(np.dtype("float32"), (-1, -1, cfg.data.vocab_size))]))
        return Served(NextTokenProbabilities(student, cfg.data.vocab_size).eval(), example, signature, torchscript=False)
