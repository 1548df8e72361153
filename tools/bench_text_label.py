#!/usr/bin/env python3
"""Labelling raw text (task text): rows/s of the label stage against a plain loop, same teachers, same batches.

Data: the built-in docstrings set (12 classes, shards of 256 rows). Teachers, built here, nothing
downloaded: a real all-MiniLM-L6-v2 classifier (kind huggingface, max_length 64, num_cpus 1; a random
12-class head: only speed matters) and a word TF-IDF + logistic regression (kind sklearn, fitted on
train by a first, untimed label run), each in batches of its batch_size (1024: a whole shard).

  label stage  ekd.label(cfg, progress=False) into a fresh, empty store each repeat (the TF-IDF
               checkpoint is kept), in one Ray session (ray.num_cpus 2): checks, the teachers' probe,
               a Ray actor per pool (fractional CPUs, 1 torch thread) side by side, the manifest.
  plain loop   one spawned process, torch.set_num_threads(1): load each teacher once (kind_of(t).load);
               for each input shard of each split read the texts (pyarrow), run each teacher in batches
               of its batch_size, encode (tasks.classification.encode, float16), write the Parquet bytes.

So the label stage may use both cores, the plain loop one: "same teachers, same batches", not same
cores. Both include start-up (actors or a process, imports, loading the teachers). rows/s = input
texts / wall s; the methods alternate, once each per repeat; median of --repeats, spread min..max.
Goal: label >= 0.9x plain. The last repeat's label shards are compared, byte for byte, with the plain loop's.
Writes OUT/text_label.md and OUT/text_label.json.

    python tools/bench_text_label.py                      # train, val, test (3,992 texts), 3 repeats
    python tools/bench_text_label.py --quick --out /tmp/t  # val and test (about 1,200 texts), 1 repeat

Internals measured directly:
  ensemblekd.stages.label: --quick times val and test alone (splits=); ekd.label labels every split
  ensemblekd.io.ray_session: the Ray session ekd starts (ensure_ray), started once for every repeat
  ensemblekd.teachers: the plain loop loads each teacher as a label actor does (kind_of(t).load)
  ensemblekd.tasks.classification: the plain loop writes ensemblekd's own label shards (encode)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

ALL_SPLITS, QUICK_SPLITS = ("train", "val", "test"), ("val", "test")


def log(msg: str) -> None:
    print(f"[bench_text_label {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(work: Path) -> dict[str, Any]:
    """The docstrings data, a MiniLM classifier directory and the config (a dict) over them."""
    from ensemblekd.data.builtin import prepare
    from ensemblekd.hf_text import builtin_encoder, load_classifier

    data = prepare("docstrings", str(work / "data"))
    encoder = builtin_encoder("minilm", str(work / "minilm"))
    load_classifier(encoder, "bench", num_labels=12, max_length=64).save_pretrained(str(work / "classifier"))
    return {
        "task": "text",
        "data": {**data, "text_column": "text", "label": "y"},
        "teachers": [
            {"name": "minilm", "kind": "huggingface", "pretrained": str(work / "classifier"), "max_length": 64,
             "num_cpus": 1},
            {"name": "tfidf", "kind": "sklearn", "model": "ensemblekd.models:tfidf_logistic", "fit": {},
             "checkpoint": str(work / "tfidf.skops")}],
        "student": {"model": "ensemblekd.hf_text:classifier",
                    "kwargs": {"num_classes": 12, "tokenizer": encoder,
                               "config": {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                                          "intermediate_size": 64}}},
        "store": {"uri": str(work / "store")},
        "trainer": {"output_dir": str(work / "out")},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}", "experiment": "bench-text-label"},
        "ray": {"num_cpus": 2}}


def label_stage(cfg, splits: tuple[str, ...]):
    """Seconds of one label run into an empty store, and its LabelResult."""
    import ensemblekd as ekd
    from ensemblekd.stages.label import label

    shutil.rmtree(cfg.store.uri, ignore_errors=True)
    t0 = time.perf_counter()
    result = ekd.label(cfg, progress=False) if splits == ALL_SPLITS else label(cfg, splits=splits, progress=False)
    seconds = time.perf_counter() - t0
    assert result.shards > 0, result  # the store was empty: it labelled every shard
    return seconds, result


def _plain_worker(raw: dict[str, Any], splits: tuple[str, ...], out: str) -> None:
    t0 = time.perf_counter()
    import torch

    import ensemblekd as ekd
    from ensemblekd.tasks.classification import encode
    from ensemblekd.teachers import kind_of

    torch.set_num_threads(1)
    cfg = ekd.load_config(raw)
    models = [(t, kind_of(t).load(cfg, t).eval()) for t in cfg.teachers]
    loaded = time.perf_counter()
    for split in splits:
        for path in sorted(Path(getattr(cfg.data, split)).glob("*.parquet")):
            table = pq.read_table(path, columns=[cfg.data.id, cfg.data.text_column])
            ids, texts = table[cfg.data.id].to_numpy(), table[cfg.data.text_column].to_pylist()
            for t, model in models:
                with torch.no_grad():
                    logits = np.concatenate([model(texts[i:i + t.batch_size]).float().numpy()
                                             for i in range(0, len(texts), t.batch_size)])
                data, _ = encode(ids, logits, "float16")
                dest = Path(out, split, t.name)
                dest.mkdir(parents=True, exist_ok=True)
                (dest / path.name).write_bytes(data)
    Path(out, "times.json").write_text(json.dumps({"load_s": loaded - t0, "label_s": time.perf_counter() - loaded}))


def plain_loop(raw: dict[str, Any], splits: tuple[str, ...], out: Path) -> tuple[float, dict[str, float]]:
    """Seconds of one plain run (a spawned process, start to exit) and its own split of them."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = mp.get_context("spawn").Process(target=_plain_worker, args=(raw, splits, str(out)))
    proc.start()
    proc.join()
    seconds = time.perf_counter() - t0
    assert proc.exitcode == 0, proc.exitcode
    return seconds, json.loads((out / "times.json").read_text())


def same_shards(cfg, splits: tuple[str, ...], plain: Path) -> list[int]:
    """[label shards byte-identical to the plain loop's, all of them] (the last repeat of each)."""
    from ensemblekd.io import fs
    from ensemblekd.store import Store

    store = Store.open(cfg.store.uri)
    pairs = [(fs.read_bytes(store.shard_uri(s, t.name, i)), (plain / s / t.name / Path(shard["uri"]).name).read_bytes())
             for s in splits for t in cfg.teachers for i, shard in enumerate(store.inputs(s))]
    return [sum(a == b for a, b in pairs), len(pairs)]


def summary(values: list[float]) -> dict[str, float]:
    from ensemblekd.testing import median_spread

    median, spread = median_spread(values)
    return {"median": median, "min": min(values), "max": max(values), "spread": spread}


def markdown(res: dict[str, Any]) -> str:
    from ensemblekd.testing import markdown_table

    m, ratio = res["machine"], res["ratio"]
    fmt = lambda s, f: f"{f.format(s['median'])} ({f.format(s['min'])}..{f.format(s['max'])})"  # noqa: E731
    rows = [[name, f"{res['texts']:,}", str(res["repeats"]), fmt(r["wall_s"], "{:.1f}"),
             fmt(r["rows_per_s"], "{:,.1f}")]
            for name, r in (("ekd.label (Ray actors, in parallel)", res["label"]),
                            ("plain loop (1 process, 1 thread)", res["plain"]))]
    actors = "; ".join(f"{'+'.join(a['teachers'])} x{a['replicas']}" for a in res["actors"])
    return "\n".join([
        "# Labelling raw text (`task: text`): the label stage against a plain loop", "",
        f"Generated by `python tools/bench_text_label.py{' ' + ' '.join(res['argv']) if res['argv'] else ''}` on "
        f"{m['date']} in {res['seconds'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gib']:.0f} GiB; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"ray {m['ray']}; load average at start {m['load_average_at_start'][0]:.1f}.", "",
        f"Input: docstrings {', '.join(res['splits'])} ({res['texts']:,} texts, {res['shards']} shards). Teachers: "
        "MiniLM-L6 classifier (max_length 64, random head) and TF-IDF + logistic regression; each in batches of its "
        "batch_size (1024: a whole shard). Same teachers, same batches: the label stage runs its actors in parallel "
        f"(a Ray actor per pool, fractional CPUs; pools: {actors}) while the plain loop is one process with "
        "torch.set_num_threads(1). Both include start-up (plain loop: "
        f"{res['plain']['load_s']['median']:.1f} s of imports and loading, median). Label shards byte-identical "
        "to the plain loop's: {} of {}.".format(*res["identical_shards"]), "",
        markdown_table(["method", "texts", "repeats", "wall s, median (min..max)", "rows/s, median (min..max)"], rows),
        "", f"label / plain, rows/s: **{ratio['median']:.2f}x** (per repeat {ratio['min']:.2f}..{ratio['max']:.2f}x); "
        f"goal >= 0.9x: {'met' if ratio['median'] >= 0.9 else 'not met'}.", ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tools/results", help="where text_label.md/json go (default tools/results)")
    p.add_argument("--quick", action="store_true", help="val and test only, 1 repeat")
    p.add_argument("--repeats", type=int, help="runs of each method (default 3; --quick: 1)")
    args = p.parse_args(argv)
    import ray
    import torch
    import transformers

    import ensemblekd as ekd
    from ensemblekd.io.ray_session import ensure_ray
    from ensemblekd.testing import machine, write_results

    start = time.perf_counter()
    splits = QUICK_SPLITS if args.quick else ALL_SPLITS
    repeats = args.repeats or (1 if args.quick else 3)
    res: dict[str, Any] = {"argv": sys.argv[1:] if argv is None else argv, "splits": splits, "repeats": repeats,
                           "machine": machine(torch=torch.__version__, ray=ray.__version__,
                                              transformers=transformers.__version__)}
    with tempfile.TemporaryDirectory(prefix="bench_text_label-") as tmp:
        work = Path(tmp)
        raw = build(work)
        cfg = ekd.load_config(raw)
        files = [f for s in splits for f in sorted(Path(getattr(cfg.data, s)).glob("*.parquet"))]
        res.update(texts=sum(pq.read_metadata(f).num_rows for f in files), shards=len(files))
        ensure_ray(cfg.ray)  # one session for every repeat: ekd.label leaves a Ray it did not start running
        try:
            log(f"fitting TF-IDF and a first, untimed label run ({res['texts']:,} texts)")
            _, first = label_stage(cfg, splits)
            res["actors"], res["fitted"] = first.actors, first.fitted
            runs: dict[str, list] = {"label": [], "plain": [], "load": []}
            for r in range(repeats):
                runs["label"].append(label_stage(cfg, splits)[0])
                seconds, inner = plain_loop(raw, splits, work / "plain")
                runs["plain"].append(seconds)
                runs["load"].append(inner["load_s"])
                log(f"repeat {r + 1}/{repeats}: label {runs['label'][-1]:.1f} s, plain {seconds:.1f} s "
                    f"(of which loading {inner['load_s']:.1f} s)")
            res["identical_shards"] = same_shards(cfg, splits, work / "plain")
        finally:
            ray.shutdown()
    for name in ("label", "plain"):
        res[name] = {"wall_s": summary(runs[name]), "rows_per_s": summary([res["texts"] / s for s in runs[name]]),
                     "runs_s": runs[name]}
    res["plain"]["load_s"] = summary(runs["load"])
    res["ratio"] = summary([p / e for e, p in zip(runs["label"], runs["plain"])])  # rows/s label / rows/s plain
    res["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "text_label", res, [], markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
