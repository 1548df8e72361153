#!/usr/bin/env python3
"""Labelling a real LM: tokens/s of `ensemblekd label` with SmolLM2-135M against a plain loop.

Both label the same pydoc train shards (data.text.prepare_pydoc with SmolLM2's tokenizer, 256-token
rows) with the same work: 2 processes of 1 torch thread each, batches of 8 rows taken longest
first and cut to their longest row, the Hugging Face forward, log-softmax and top-32 in float32
(ensemblekd.topk.topk_targets), and one Parquet shard written per input shard
(tasks.token.encode), with the next token's log-prob column. ensemblekd adds what a plain loop
lacks: Ray actors (replicas: 2, num_cpus: 1), the manifest and its commits, checksums, and the
input checks before any work. The plain loop is 2 spawned processes, each taking every other shard.
Where the CPU went during each full run is sampled (psutil, every 0.5 s, this process and all its
descendants): the labelling processes (Ray workers / the plain loop's), the driver, and Ray's own
processes (GCS, raylet, dashboard, agents), whose share of the 2 cores the labelling workers lose.

Start-up (Ray, actors, dequantising the GGUF file: ~30 s a process) is separated out as in
bench_speed.py: each method labels the full input and a tiny one (1 shard of 2 rows), and the
steady rate is (tokens - tiny tokens) / (full s - tiny s).

Writes OUT/label_lm.md and OUT/label_lm.json.

    python tools/bench_label_lm.py                 # 4 shards of 32 rows (~32k tokens): ~8 min
    python tools/bench_label_lm.py --quick --out /tmp/lm   # 1 shard of 4 rows: a smoke test, numbers mean nothing

Internals measured directly:
  ensemblekd.stages.label: timed on train alone (splits=); ekd.label also labels val and test and checks the config
  ensemblekd.data.text: pydoc rows in SmolLM2's tokenizer (prepare_pydoc); testing.tiny_data writes no such text
  ensemblekd.lm: the built-in SmolLM2 file (builtin_gguf), loaded by the plain loop as a label actor does (from_gguf)
  ensemblekd.topk: the plain loop's top-k targets, a label actor's own function (topk_targets)
  ensemblekd.tasks.token: the plain loop writes ensemblekd's own token shards (encode)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

BATCH, TOP_K, PROCESSES = 8, 32, 2


def log(msg: str) -> None:
    print(f"[bench_label_lm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_inputs(work: Path, gguf: str, shards: int, rows: int) -> dict[str, Path]:
    """pydoc's train split in shards of `rows` rows; the first `shards` of them as the full input,
    one shard cut to 2 rows as the tiny one."""
    import pyarrow as pa

    from ensemblekd.data.text import prepare_pydoc

    prepare_pydoc(str(work / "pydoc"), gguf, seq_len=256, shard_rows=rows)
    source = sorted((work / "pydoc" / "train").glob("*.parquet"))[:shards]
    full, tiny = work / "full", work / "tiny"
    full.mkdir()
    tiny.mkdir()
    for path in source:
        shutil.copy(path, full / path.name)
    pq.write_table(pa.Table.from_batches(pq.read_table(source[0]).to_batches(max_chunksize=2)[:1]),
                   tiny / "part-00000.parquet")
    return {"full": full, "tiny": tiny}


class CpuMeter:
    """CPU seconds (user + system) of this process and its descendants while the block runs, by
    role: 'driver' (this process), 'labelling' (Ray workers, named ray::..., or the plain loop's
    processes) and 'ray system' (every other descendant). Sampled every 0.5 s; a process's last
    half-second before it exits may be missed."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process(os.getpid())
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.stop = threading.Event()

    def role(self, proc) -> str:
        if proc.pid == self.me.pid:
            return "driver"
        cmd = " ".join(proc.cmdline())
        return "labelling" if cmd.startswith("ray::") or "multiprocessing" in cmd else "ray system"

    def sample(self) -> None:
        import psutil

        for proc in [self.me, *self.me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                used = t.user + t.system
                self.first.setdefault(proc.pid, used if proc.pid in self.last or proc.pid == self.me.pid else 0.0)
                self.last[proc.pid] = (self.role(proc), used)
            except psutil.Error:
                continue

    def __enter__(self) -> CpuMeter:
        self.sample()
        self.first = {pid: used for pid, (_, used) in self.last.items()}   # what ran before the block
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()

    def by_role(self) -> dict[str, float]:
        out = {"driver": 0.0, "labelling": 0.0, "ray system": 0.0}
        for pid, (role, used) in self.last.items():
            out[role] += used - self.first.get(pid, 0.0)
        return out


def tokens_of(split: Path) -> int:
    return sum(len(t) - 1 for f in sorted(split.glob("*.parquet")) for t in pq.read_table(f)["tokens"].to_pylist())


def label_ensemblekd(work: Path, gguf: str, split: Path, tag: str) -> float:
    import ray

    import ensemblekd as ekd
    from ensemblekd.stages.label import label

    cfg = ekd.load_config({
        "task": "token",
        "data": {"train": str(split), "val": str(split), "test": str(split), "features": "tokens",
                 "vocab_size": 49152, "tokenizer": "teachers"},
        "teachers": [{"name": "smollm2", "pretrained": gguf, "batch_size": BATCH, "replicas": PROCESSES,
                      "num_cpus": 1}],
        "store": {"uri": str(work / "stores" / tag), "top_k": TOP_K},
        "student": {"model": "ensemblekd.lm:tiny_gpt2", "kwargs": {"vocab_size": 49152}},
        "trainer": {"output_dir": str(work / "out")}, "ray": {"num_cpus": 2}})
    t0 = time.perf_counter()
    try:  # Ray is started inside the timed call and shut down after it
        label(cfg, splits=("train",), progress=False)
        return time.perf_counter() - t0
    finally:
        ray.shutdown()


def _plain_worker(paths: list[str], gguf: str, out: str) -> None:
    import torch

    from ensemblekd.lm import from_gguf
    from ensemblekd.tasks.token import encode
    from ensemblekd.topk import topk_targets

    torch.set_num_threads(1)
    model = from_gguf(gguf)
    for path in paths:
        table = pq.read_table(path, columns=["id", "tokens"])
        rows = [np.asarray(t, dtype=np.int64) for t in table["tokens"].to_pylist()]
        lengths = np.array([len(r) for r in rows])
        order = np.argsort(-lengths, kind="stable")
        per_row: list = [None] * len(rows)
        for start in range(0, len(rows), BATCH):
            picked = order[start:start + BATCH]
            width = int(lengths[picked].max())
            batch = torch.zeros(len(picked), width, dtype=torch.long)
            for r, row in enumerate(picked):
                batch[r, :lengths[row]] = torch.from_numpy(rows[row])
            with torch.inference_mode():
                logits = model(batch).float()
            keep = lengths[picked] - 1
            following = torch.cat([batch[r, 1:n + 1] for r, n in enumerate(keep)])
            targets = topk_targets(torch.cat([logits[r, :n] for r, n in enumerate(keep)]), TOP_K, following=following)
            bounds = np.concatenate([[0], np.cumsum(keep)])
            for r, row in enumerate(picked):
                per_row[row] = [t[bounds[r]:bounds[r + 1]] for t in targets]
        logp, idx, tail, nxt = (np.concatenate(p) for p in zip(*per_row))
        data, _ = encode(table["id"].to_numpy(), lengths - 1, logp, idx, tail, nxt=nxt)
        Path(out, Path(path).name).write_bytes(data)


def label_plain(work: Path, gguf: str, split: Path, tag: str) -> float:
    import multiprocessing as mp

    out = work / "plain" / tag
    out.mkdir(parents=True)
    paths = [str(p) for p in sorted(split.glob("*.parquet"))]
    spawn = mp.get_context("spawn")
    t0 = time.perf_counter()
    procs = [spawn.Process(target=_plain_worker, args=(paths[r::PROCESSES], gguf, str(out)))
             for r in range(PROCESSES)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return time.perf_counter() - t0


def markdown(res: dict[str, Any]) -> str:
    from ensemblekd.testing import markdown_table

    e, p = res["ensemblekd"], res["plain"]
    ratio = e["tokens_per_s"] / p["tokens_per_s"]
    m = res["machine"]
    methods = (("ensemblekd label", e), ("plain loop", p))
    return "\n".join([
        "# Labelling SmolLM2-135M: `ensemblekd label` against a plain loop", "",
        f"Generated by `python tools/bench_label_lm.py{' --quick' if res['quick'] else ''}` on {m['date']} in "
        f"{res['seconds'] / 60:.1f} min. Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, ray {m['ray']}; "
        f"load average at start {m['load_average_at_start'][0]:.1f}.", "",
        f"Input: {res['shards']} pydoc train shard(s), {res['tokens']:,} target tokens (tiny input: "
        f"{res['tiny_tokens']:,}); {PROCESSES} processes x 1 thread, batches of {BATCH} rows by length, top-{TOP_K}.",
        "", markdown_table(["method", "wall s", "tiny-input s (start-up)", "steady tokens/s", "tokens/s with start-up"],
                           [[name, f"{r['wall_s']:.1f}", f"{r['startup_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
                             f"{r['tokens_per_s_with_startup']:,.0f}"] for name, r in methods]),
        "", f"ensemblekd / plain, steady: **{ratio:.2f}x** (goal >= 0.9x: {'met' if ratio >= 0.9 else 'not met'}).",
        "", f"Where the CPU went during the full runs (CPU s; {os.cpu_count()} cores x wall s is the most there was):", "",
        markdown_table(["method", "labelling processes", "driver", "Ray's own processes", "cores x wall"],
                       [[name, f"{r['cpu_s']['labelling']:.1f}", f"{r['cpu_s']['driver']:.1f}",
                         f"{r['cpu_s']['ray system']:.1f}", f"{os.cpu_count() * r['wall_s']:.1f}"]
                        for name, r in methods]),
        ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tools/results", help="where label_lm.md/json go (default tools/results)")
    p.add_argument("--quick", action="store_true", help="1 shard of 4 rows: a smoke test")
    args = p.parse_args(argv)
    import ray
    import torch
    import transformers

    from ensemblekd.lm import builtin_gguf
    from ensemblekd.testing import machine, write_results

    start = time.perf_counter()
    res: dict[str, Any] = {"quick": args.quick, "machine": machine(torch=torch.__version__, ray=ray.__version__,
                                                                    transformers=transformers.__version__)}
    shards, rows = (1, 4) if args.quick else (4, 32)
    with tempfile.TemporaryDirectory(prefix="bench_label_lm-") as tmp:
        work = Path(tmp)
        gguf = builtin_gguf("smollm2", str(work / "smollm2.gguf"))
        splits = make_inputs(work, gguf, shards, rows)
        res.update(shards=shards, tokens=tokens_of(splits["full"]), tiny_tokens=tokens_of(splits["tiny"]))
        for name, fn in (("ensemblekd", label_ensemblekd), ("plain", label_plain)):
            tiny = fn(work, gguf, splits["tiny"], f"{name}-tiny")
            with CpuMeter() as cpu:
                full = fn(work, gguf, splits["full"], f"{name}-full")
            log(f"{name}: {full:.1f} s for {res['tokens']:,} tokens (tiny input {tiny:.1f} s); CPU s "
                + ", ".join(f"{role} {sec:.1f}" for role, sec in cpu.by_role().items()))
            res[name] = {"wall_s": full, "startup_s": tiny, "cpu_s": cpu.by_role(),
                         "tokens_per_s": (res["tokens"] - res["tiny_tokens"]) / max(full - tiny, 1e-3),
                         "tokens_per_s_with_startup": res["tokens"] / full}
    res["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "label_lm", res, [], markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
