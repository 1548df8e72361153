#!/usr/bin/env python3
"""Token-level soft targets: what the top-k store costs per token, and what it keeps.

For `task: token` a teacher stores, per token, its k most likely ids with their log-probs and the
log of the mass outside them (ensemblekd.topk). This measures, for k in {8, 32, 128}:

  bytes      Parquet bytes per token of tasks.token.encode (the shard as written, footer included)
             on the teacher's real top-k, and on the same values with ids drawn uniformly at
             random (no redundancy in the ids to exploit), against full float16 logits (V × 2 B)
             and a plain top-32 float16 + int32 store (192 B/token).
  mass       the share of the teacher's probability in its top k (float32 softmax over the full
             vocabulary): mean and 5th percentile over tokens.
  KL         KL(full || reconstructed) in nats/token, the reconstruction being dense_from_topk
             (top-k in place, the tail spread evenly), renormalised as the loss's buckets are.

Teachers are tiny causal LMs (ensemblekd.lm) fitted for seconds on a synthetic Zipf/Markov
language (data.builtin.markov_corpus) and evaluated on held-out sequences of it: three of different depth
at a demo vocabulary of 512, one each at 32k and 128k (the vocabulary sizes of real tokenizers,
where full logits are 64 KB and 256 KB per token). Big-vocabulary teachers are fitted far less
than a real LM, so they are less peaked than one: their mass figures are pessimistic.

Writes OUT/lm_store.md (the table) and OUT/lm_store.json (settings, machine, every number).

    python tools/bench_lm_store.py                        # the full run (see lm_store.md for its time)
    python tools/bench_lm_store.py --quick --out /tmp/lm  # smoke test (< 1 min): it runs, its numbers mean nothing

Internals measured directly:
  ensemblekd.topk: the top-k targets and their reconstruction are what is measured
  ensemblekd.tasks.token: the token shard codec (encode, decode), measured
  ensemblekd.store: the store's own Parquet unpack, under the codec's decode
  ensemblekd.lm: the teachers: tiny causal LMs, fitted with fit_lm, run with predict_lm
  ensemblekd.data.builtin: the synthetic language (markov_corpus; prepare_markov smaller than data.prepare's)
  ensemblekd.stages.fit: the throughput run fits the teachers untimed (ekd.label fits them inside the label call)
  ensemblekd.stages.label: timed on train and val alone (splits=); ekd.label also labels test and checks the config
  ensemblekd.stages.distill: timed without MLflow; ekd.distill logs every epoch and the student inside the time
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

KS = (8, 32, 128)
ANCHOR_TOP32_B = 32 * (2 + 4)           # a plain top-32 store: float16 value + int32 id
TARGET_K, TARGET_BYTES, TARGET_MASS = 32, 100.0, 0.95
EVAL_CHUNK_TOKENS = 512                 # logits [512, 128k] float32 = 256 MB per chunk
QUICK_NOTE = " (a --quick smoke run: teachers barely fitted, the figures mean nothing)"


@dataclass
class Teacher:
    name: str
    builder: str                        # a callable of ensemblekd.lm
    kwargs: dict[str, Any]


@dataclass
class VocabRun:
    """One vocabulary: its language, its teachers and how long they are fitted."""

    vocab_size: int
    teachers: list[Teacher]
    seq_len: int
    train_seqs: int
    eval_seqs: int
    epochs: int
    batch_size: int
    lr: float


@dataclass
class Sizes:
    runs: list[VocabRun] = field(default_factory=list)


DEMO_TEACHERS = [Teacher("gpt2_1x64", "tiny_gpt2", {"n_layer": 1, "n_embd": 64}),
                 Teacher("gpt2_2x64", "tiny_gpt2", {"n_layer": 2, "n_embd": 64}),
                 Teacher("llama_4x64", "tiny_llama", {"num_hidden_layers": 4, "hidden_size": 64})]
FULL = Sizes([
    VocabRun(512, DEMO_TEACHERS, seq_len=32, train_seqs=1024, eval_seqs=256, epochs=6, batch_size=8, lr=1e-2),
    VocabRun(32768, [Teacher("gpt2_2x64", "tiny_gpt2", {"n_layer": 2, "n_embd": 64})],
             seq_len=16, train_seqs=1024, eval_seqs=256, epochs=4, batch_size=4, lr=1e-2),
    VocabRun(131072, [Teacher("gpt2_1x32", "tiny_gpt2", {"n_layer": 1, "n_embd": 32})],
             seq_len=16, train_seqs=768, eval_seqs=256, epochs=4, batch_size=4, lr=2e-2),
])
QUICK = Sizes([
    VocabRun(512, DEMO_TEACHERS, seq_len=16, train_seqs=64, eval_seqs=16, epochs=1, batch_size=8, lr=1e-2),
    VocabRun(32768, [Teacher("gpt2_1x32", "tiny_gpt2", {"n_layer": 1, "n_embd": 32})],
             seq_len=16, train_seqs=16, eval_seqs=8, epochs=1, batch_size=8, lr=1e-2),
    VocabRun(131072, [Teacher("gpt2_1x32", "tiny_gpt2", {"n_layer": 1, "n_embd": 32})],
             seq_len=16, train_seqs=16, eval_seqs=8, epochs=1, batch_size=8, lr=2e-2),
])


def log(msg: str) -> None:
    print(f"[bench_lm_store {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- teachers ----------------------------------------------------------------------------------
def fit_teacher(run: VocabRun, t: Teacher, train: np.ndarray, held_out: np.ndarray, seed: int) -> tuple[Any, dict]:
    """Build and fit one teacher; its size, fit time and held-out next-token loss."""
    import torch

    from ensemblekd import lm

    torch.manual_seed(seed)
    model = getattr(lm, t.builder)(run.vocab_size, **t.kwargs)
    t0 = time.perf_counter()
    lm.fit_lm(model, train, epochs=run.epochs, lr=run.lr, batch_size=run.batch_size, seed=seed)
    fit_s = time.perf_counter() - t0
    nll, n = 0.0, 0
    for logits, targets in iter_logits(model, held_out):
        keep = targets >= 0
        nll += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
        n += int(keep.sum())
    info = {"name": t.name, "builder": t.builder, "kwargs": t.kwargs,
            "parameters": sum(p.numel() for p in model.parameters()), "fit_s": fit_s, "held_out_nll": nll / max(n, 1)}
    return model, info


def iter_logits(model, seqs: np.ndarray, chunk_tokens: int = EVAL_CHUNK_TOKENS):
    """(float32 logits [n, V], next-token targets [n] with -1 at each sequence's last position),
    a few sequences at a time: [tokens, 128k] logits of a whole eval set would not fit."""
    import torch

    from ensemblekd import lm

    per = max(chunk_tokens // seqs.shape[1], 1)
    for i in range(0, len(seqs), per):
        part = seqs[i:i + per]
        logits = torch.from_numpy(lm.predict_lm(model, part, batch_size=len(part)))
        targets = torch.full(part.shape, -1, dtype=torch.long)
        targets[:, :-1] = torch.from_numpy(part[:, 1:].astype(np.int64))
        yield logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)


# -- measurements ------------------------------------------------------------------------------
def measure_teacher(model, seqs: np.ndarray, vocab_size: int, ks: tuple[int, ...], seed: int) -> dict[int, dict]:
    """Per k: top-k targets of every position of `seqs` (one Parquet shard, a row per sequence),
    its bytes, the mass the top-k keeps and KL(full || reconstructed)."""
    import torch

    from ensemblekd import topk
    from ensemblekd.store import unpack
    from ensemblekd.tasks import token

    parts: dict[int, list] = {k: [] for k in ks}
    mass: dict[int, list] = {k: [] for k in ks}
    kl: dict[int, list] = {k: [] for k in ks}
    tail_gap = {k: 0.0 for k in ks}
    for logits, _ in iter_logits(model, seqs):
        logp_full = torch.log_softmax(logits, dim=-1)
        p = logp_full.exp()
        top = p.topk(max(ks), dim=-1).values.cumsum(-1)
        for k in ks:
            logp, idx, tail = topk.topk_targets(logits, k)
            parts[k].append((logp, idx, tail))
            kept = top[:, k - 1]
            mass[k].append(kept.numpy())
            tail_gap[k] = max(tail_gap[k], float((kept - (1 - torch.from_numpy(tail).float().exp())).abs().max()))
            q = topk.dense_from_topk(logp, idx, tail, vocab_size)
            log_q = (q / q.sum(-1, keepdim=True)).log()
            kl[k].append(torch.where(p > 0, p * (logp_full - log_q), 0.0).sum(-1).numpy())
            del q, log_q
    rng = np.random.default_rng(seed)
    ids = np.arange(len(seqs), dtype=np.int64)
    lengths = np.full(len(seqs), seqs.shape[1], dtype=np.int64)
    out = {}
    for k in ks:
        logp, idx, tail = (np.concatenate(a) for a in zip(*parts[k]))
        n = len(logp)
        t0 = time.perf_counter()
        data, entry = token.encode(ids, lengths, logp, idx, tail)
        t1 = time.perf_counter()
        back = token.decode(unpack(data))
        t2 = time.perf_counter()
        pairs = ((back[2], logp), (back[4], tail))  # float16 compared bit for bit (NaN, −inf included)
        same_bits = [np.array_equal(a.view(np.uint16), b.view(np.uint16)) for a, b in pairs]
        round_trip = (np.array_equal(back[0], ids) and np.array_equal(back[1], lengths) and all(same_bits)
                      and back[3].dtype == idx.dtype and np.array_equal(back[3], idx))
        t3 = time.perf_counter()
        smallest = len(token.encode(ids, lengths, logp, idx, tail, level=19)[0])
        t4 = time.perf_counter()
        random_idx = rng.integers(0, vocab_size, idx.shape).astype(idx.dtype)
        random_bytes = len(token.encode(ids, lengths, logp, random_idx, tail)[0])
        m, d = np.concatenate(mass[k]), np.concatenate(kl[k])
        out[k] = {"k": k, "tokens": n, "bytes": entry["bytes"], "bytes_per_token": entry["bytes"] / n,
                  "random_ids_bytes_per_token": random_bytes / n, "zstd19_bytes_per_token": smallest / n,
                  "zstd19_encode_tokens_per_s": n / (t4 - t3),
                  "raw_bytes_per_token": logp.itemsize * k + idx.itemsize * k + tail.itemsize,
                  "index_dtype": str(idx.dtype), "full_f16_bytes_per_token": 2 * vocab_size,
                  "mass_mean": float(m.mean()), "mass_p5": float(np.quantile(m, 0.05)), "kl_mean": float(d.mean()),
                  "kl_p95": float(np.quantile(d, 0.95)), "tail_vs_mass_max_abs": tail_gap[k], "round_trip": round_trip,
                  "encode_tokens_per_s": n / (t1 - t0), "decode_tokens_per_s": n / (t2 - t1)}
    return out


THROUGHPUT_KS = (32, 512)  # the top-k store, and k = V = 512: the full distribution (the dense-logit run)


def label_distill_throughput(quick: bool) -> dict[str, Any] | None:
    """Label + distill tokens/s through the real pipeline (Ray actors, Ray Train + DeepSpeed) on
    configs/tiny_lm.yaml, with the top-32 store against the full distribution (k = V), same data,
    teachers and student. tokens/s: label = input tokens of train + val run through all three
    teachers per second of stage wall time; distill = train target tokens per second of the last
    epoch (its `epoch_seconds` metric). Not run with --quick (it starts Ray and DeepSpeed)."""
    if quick:
        return None
    import tempfile

    import ray

    import ensemblekd as ekd
    from ensemblekd.data.builtin import prepare_markov
    from ensemblekd.stages.distill import distill
    from ensemblekd.stages.fit import fit_teachers
    from ensemblekd.stages.label import label

    root = Path(__file__).resolve().parents[1]
    out: dict[str, Any] = {"runs": {}}
    with tempfile.TemporaryDirectory(prefix="ekd-lm-tp-") as work:
        prepare_markov(f"{work}/data", vocab_size=512, seq_len=64, train=1024, val=128, test=128, shard_rows=128)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        try:
            for k in THROUGHPUT_KS:
                sets = [f"data.{s}={work}/data/{s}" for s in ("train", "val", "test")] + [
                    "data.prepare=null", f"store.uri={work}/store-{k}", f"store.top_k={k}", "trainer.epochs=2",
                    f"trainer.output_dir={work}/out-{k}"] + [f"teachers.{i}.checkpoint={work}/t{i}.pt" for i in range(3)]
                cfg = ekd.load_config(root / "configs" / "tiny_lm.yaml", sets)
                fit_teachers(cfg, progress=False)
                t0 = time.perf_counter()
                labelled = label(cfg, splits=("train", "val"), progress=False)
                label_s = time.perf_counter() - t0
                store = ekd.open_store(cfg.store.uri)
                input_tokens = sum(e["tokens"] + e["rows"] for s in ("train", "val")
                                   for e in store.manifest["shards"][s][cfg.teachers[0].name].values())
                train_targets = sum(e["tokens"] for e in store.manifest["shards"]["train"][cfg.teachers[0].name].values())
                result = distill(cfg, None, progress=False)
                epoch_s = result.metrics["epoch_seconds"]
                out["runs"][str(k)] = {"label_s": label_s, "label_tokens_per_s": input_tokens / label_s,
                                       "distill_epoch_s": epoch_s, "distill_tokens_per_s": train_targets / epoch_s,
                                       "distill_wall_s": result.seconds, "bytes_per_token": store.bytes_per('token'),
                                       "val_accuracy": result.metrics["val_accuracy"], "shards": labelled.shards}
                log(f"throughput k={k}: label {input_tokens / label_s:,.0f} tokens/s, distill "
                    f"{train_targets / epoch_s:,.0f} tokens/s, {store.bytes_per('token'):.1f} B/token")
        finally:
            ray.shutdown()
    return out


def run_vocab(run: VocabRun, seed: int, ks: tuple[int, ...]) -> dict[str, Any]:
    from ensemblekd import lm
    from ensemblekd.data.builtin import markov_corpus

    train = markov_corpus(run.vocab_size, run.train_seqs, run.seq_len, seed=seed, sample_seed=seed * 3 + 1)
    held_out = markov_corpus(run.vocab_size, run.eval_seqs, run.seq_len, seed=seed, sample_seed=seed * 3 + 2)
    res: dict[str, Any] = {"vocab_size": run.vocab_size, "vocab_hash": lm.vocab_hash(run.vocab_size),
                           "settings": asdict(run), "teachers": []}
    for i, t in enumerate(run.teachers):
        model, info = fit_teacher(run, t, train, held_out, seed + i)
        t0 = time.perf_counter()
        info["by_k"] = measure_teacher(model, held_out, run.vocab_size, ks, seed + i)
        info["measure_s"] = time.perf_counter() - t0
        res["teachers"].append(info)
        log(f"V={run.vocab_size} {t.name}: {info['parameters']:,} params, fit {info['fit_s']:.1f} s, held-out NLL "
            f"{info['held_out_nll']:.2f}; " + ", ".join(
                f"k={k} {r['bytes_per_token']:.1f} B/tok mass {r['mass_mean']:.3f}" for k, r in info["by_k"].items()))
    return res


# -- report ------------------------------------------------------------------------------------
def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for v in res["vocabs"]:
        for t in v["teachers"]:
            for k, r in t["by_k"].items():
                target = int(k) == TARGET_K
                met = (r["bytes_per_token"] <= TARGET_BYTES and r["mass_mean"] >= TARGET_MASS) if target else None
                rows.append({"vocab_size": v["vocab_size"], "teacher": t["name"], **r,
                             "ratio_vs_full": r["full_f16_bytes_per_token"] / r["bytes_per_token"],
                             "target": f"≤ {TARGET_BYTES:g} B/token, mass ≥ {TARGET_MASS:g}" if target else None,
                             "met": met})
    return rows


def throughput_text(tp: dict[str, Any] | None) -> str:
    import textwrap

    from ensemblekd.testing import markdown_table

    if tp is None:
        return "- Label + distill throughput: not measured with --quick."
    runs = tp["runs"]
    top, dense = runs[str(THROUGHPUT_KS[0])], runs[str(THROUGHPUT_KS[1])]
    lines = ["- Label + distill throughput through the pipeline (configs/tiny_lm.yaml: 3 teachers, 2 Ray Train "
             "workers, DeepSpeed ZeRO-0; 1,024 + 128 sequences of 64 tokens, V = 512), top-32 store against the "
             "full distribution (k = V):", "",
             textwrap.indent(markdown_table(["store", "B/token", "label, tokens/s", "distill, tokens/s"],
                                            [[name, f"{r['bytes_per_token']:.1f}", f"{r['label_tokens_per_s']:,.0f}",
                                              f"{r['distill_tokens_per_s']:,.0f}"]
                                             for name, r in (("top-32 + tail", top), ("full (k = V = 512)", dense))]),
                             "  ")]
    lines += ["", f"  top-32 against full: label {top['label_tokens_per_s'] / dense['label_tokens_per_s']:.2f}×, distill "
              f"{top['distill_tokens_per_s'] / dense['distill_tokens_per_s']:.2f}×, store "
              f"{dense['bytes_per_token'] / top['bytes_per_token']:.1f}× smaller."]
    return "\n".join(lines)


def markdown(res: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from ensemblekd.testing import markdown_table

    m, st = res["machine"], res["settings"]
    lines = [
        "# Token-level soft targets: bytes per token and what the top-k keeps",
        "",
        (f"Generated by `python tools/bench_lm_store.py{' --quick' if st['quick'] else ''}` on {m['date']} in "
         f"{res['minutes']:.1f} min{QUICK_NOTE if st['quick'] else ''}."),
        (f"Machine: {m['cpu']}, {m['cores']} cores ({st['threads']} torch thread(s) used), {m['memory_gib']:.0f} GiB; "
         f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, pyarrow {m['pyarrow']}, "
         f"numpy {m['numpy']}; load average at start {m['load_average_at_start'][0]:.1f}."),
        "",
        f"Measured version of `ensemblekd/topk.py` + `ensemblekd/tasks/token/codec.py`: sha256 {m['topk_codec_sha256']}.",
        "",
        ("Teachers (tiny causal LMs from `ensemblekd.lm`, fitted with `fit_lm` on `markov_corpus`, measured on "
        "held-out sequences of the same language; every position of every sequence is one token):"),
        "",
    ]
    for v in res["vocabs"]:
        s = v["settings"]
        for t in v["teachers"]:
            lines.append(f"- V = {v['vocab_size']:,}: {t['name']} ({t['builder']} {t['kwargs']}, {t['parameters']:,} "
                         f"parameters), fitted {s['epochs']} epoch(s) on {s['train_seqs']:,} × {s['seq_len']} tokens "
                         f"in {t['fit_s']:.1f} s; held-out NLL {t['held_out_nll']:.2f} nats/token; measured on "
                         f"{next(iter(t['by_k'].values()))['tokens']:,} tokens.")
    lines += [
        "",
        markdown_table(["V", "teacher", "k", "ids", "raw B/token", "top-k store B/token", "same, random ids", "at zstd 19",
                        "full f16 B/token", "× smaller than full", "mass kept, mean", "mass kept, p5", "KL nats/token",
                        "encode / decode, tokens/s", "encode at zstd 19", "target", "met"],
                       [[f"{r['vocab_size']:,}", r["teacher"], r["k"], r["index_dtype"], r["raw_bytes_per_token"],
                         f"{r['bytes_per_token']:.1f}", f"{r['random_ids_bytes_per_token']:.1f}",
                         f"{r['zstd19_bytes_per_token']:.1f}", f"{r['full_f16_bytes_per_token']:,}",
                         f"{r['ratio_vs_full']:,.0f}×", f"{r['mass_mean']:.4f}", f"{r['mass_p5']:.4f}",
                         f"{r['kl_mean']:.4f}", f"{r['encode_tokens_per_s']:,.0f} / {r['decode_tokens_per_s']:,.0f}",
                         f"{r['zstd19_encode_tokens_per_s']:,.0f}", r["target"] or "—",
                         "—" if r["met"] is None else ("yes" if r["met"] else "**no**")] for r in rows], left=0),
    ]
    tp = res.get("throughput")
    big = [t for v in res["vocabs"] if v["vocab_size"] > 512 for t in v["teachers"]]
    caveat = ""
    if big:
        caveat = (f" The big-vocabulary teachers are fitted for {min(t['fit_s'] for t in big):.0f}–"
                  f"{max(t['fit_s'] for t in big):.0f} s (held-out NLL {min(t['held_out_nll'] for t in big):.2f}–"
                  f"{max(t['held_out_nll'] for t in big):.2f} nats/token), far from a real LM's peakedness, so their "
                  "mass and KL are pessimistic; their bytes are the real cost of their top-k.")
    anchors = ", ".join(f"{v['vocab_size']:,}: {2 * v['vocab_size']:,} B" for v in res["vocabs"])
    lines += [
        "",
        (f"- Anchors: full float16 logits = V × 2 B/token ({anchors}); a plain top-32 float16 + int32 store, "
         f"uncompressed = {ANCHOR_TOP32_B} B/token."),
        ("- Raw = k × (2 B + the id's bytes) + 2 B of tail, before Parquet. Top-k store = "
         "`tasks.token.encode` (log-probs float16, ids in the narrowest unsigned type, the tail log-mass "
         "float16; zstd level 3, the default `store.compression_level`, with byte-stream split; 'at zstd 19': "
         "the smallest setting), the whole Parquet file of all measured tokens divided by their "
         "count; encode / decode = one tasks.token.encode / decode (of the Parquet bytes) call each, one core, on a possibly "
         "busy machine (indicative only). 'Same, random ids' replaces the ids with uniform random ones: what ids "
         "with no redundancy cost (the synthetic language's ids are Zipf-distributed, as real text's are, which "
         "the column codec exploits)."),
        ("- Mass kept = Σ of the top-k probabilities of the float32 softmax over the full vocabulary. KL = Σ p "
         "(log p − log q), q = `topk.dense_from_topk` renormalised; it is the information lost by keeping only "
         "the top k."),
        throughput_text(tp),
        ("- Checks: tasks.token.decode gives back exactly what was encoded: "
         f"{'yes' if all(r['round_trip'] for r in rows) else '**no**'}; 1 − exp(tail) matches the mass kept to "
         f"within {max(r['tail_vs_mass_max_abs'] for r in rows):.1e}."),
        "",
        (f"Target: at k = {TARGET_K}, ≤ {TARGET_BYTES:g} B/token with ≥ {TARGET_MASS:g} of the teacher's mass kept "
         f"(mean over tokens); `met` checks both.{caveat}"),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tools/results",
                   help="where lm_store.md and lm_store.json go (default tools/results)")
    p.add_argument("--quick", action="store_true", help="smoke test: teachers fitted for a few steps, a few sequences")
    p.add_argument("--vocab", default=None, help="comma-separated subset of the vocabulary sizes (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0, help="the language's and the teachers' seed (default 0)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    runs = sizes.runs
    if args.vocab:
        wanted = {int(v) for v in args.vocab.split(",") if v.strip()}
        unknown = wanted - {r.vocab_size for r in runs}
        if unknown:
            p.error(f"--vocab: unknown {sorted(unknown)}; choose from {','.join(str(r.vocab_size) for r in runs)}")
        runs = [r for r in runs if r.vocab_size in wanted]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    settings = {"quick": args.quick, "threads": args.threads, "seed": args.seed, "ks": list(KS),
                "runs": [asdict(r) for r in runs]}
    from bench_common import lm_machine

    res: dict[str, Any] = {"machine": lm_machine(), "settings": settings}
    res["vocabs"] = [run_vocab(r, args.seed, KS) for r in runs]
    res["throughput"] = label_distill_throughput(args.quick)
    res["minutes"] = (time.perf_counter() - start) / 60
    res["vocabs"] = json.loads(json.dumps(res["vocabs"]))  # int keys -> str, as they will be read back
    from ensemblekd.testing import write_results

    rows = table_rows(res)
    write_results(out, "lm_store", res, rows, markdown(res, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
