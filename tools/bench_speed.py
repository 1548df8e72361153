#!/usr/bin/env python3
"""Speed, side by side: ensemblekd against the plain ways of doing the same work.

Synthetic data (N train rows x 512 float32 features, 10 classes, Parquet shards in the layout
ensemblekd reads), three random-init MLP teachers of about 3.3 MFLOP per row and one MLP student
about 50x smaller. Four benchmarks, each the median of --repeats runs:

  label      ensemblekd `label` (default placement; also one pool per teacher, the default before,
             for reference) against a plain 2-process x 1-thread torch loop (same Parquet in, same teachers, same label shards out) and
             Ray Data read_parquet -> map_batches(2 teacher actors) -> write_parquet.
             rows/s = input rows labelled by all three teachers per second.
  distill    offline KD (ensemblekd distill: Ray Train, 2 workers, DeepSpeed ZeRO-0, from the
             store) against online KD (a plain 2-process DDP loop running the three teachers in
             every step), plus the same plain loop on the stored logits and on hard labels only;
             per epoch and end to end (Ray start + label + distill against online).
  store      the trainer's reader (the task's batches) against a bare pyarrow read of the same
             files; label-shard bytes per row against the theoretical size.
  deepspeed  the student's step under DeepSpeed ZeRO-0..3 against plain torch DDP (2 processes,
             gloo, global batch 256).

Writes OUT/speed.md (the table: measurement, ensemblekd, baseline, ratio, target, met) and
OUT/speed.json (settings, machine, every repeat). Data and stores live in a temporary --work
directory, removed at the end.

    python tools/bench_speed.py                      # the full benchmark (see README for its time)
    python tools/bench_speed.py --quick --out /tmp/s  # smoke test: a few thousand rows, 1 repeat
    python tools/bench_speed.py --only label,store    # some of the benchmarks

Internals measured directly:
  ensemblekd.stages.label: timed on the given splits alone (splits=); ekd.label labels all and checks the config
  ensemblekd.stages.distill: timed without MLflow; ekd.distill logs every epoch and the student inside the time
  ensemblekd.store: the trainer's reader reads the Store itself; the plain loops read its shard files (shard_uri)
  ensemblekd.tasks: the trainer's reader (Task.batches) and its shards per worker (worker_segments, the plain loops' too)
  ensemblekd.tasks.classification: the plain labeller writes ensemblekd's own label shards (encode)
  ensemblekd.losses: the plain loops and the step benchmark use the trainer's loss (kd_loss)
  ensemblekd.stages.train: the step benchmark runs the trainer's own DeepSpeed config (deepspeed_config)
  ensemblekd.config: the TrainerConfig that deepspeed_config takes
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed (spawned children inherit it)

import argparse
import functools
import itertools
import json
import math
import shutil
import socket
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FEATURES, CLASSES = 512, 10
# Three teachers of about 3.3 MFLOP per row (different depth and width), one student.
TEACHERS = {"t_wide": [1024, 1024], "t_bottleneck": [1536, 576], "t_deep": [768, 768, 768, 256]}
STUDENT_HIDDEN = [64]
TEMPERATURE, ALPHA, LR = 4.0, 0.5, 3e-3
GLOBAL_BATCH, WORKERS = 256, 2          # the trainer's global batch (128 per worker) and worker count
TEACHER_BATCH = 1024                    # rows per teacher forward, in every labeller
RAYDATA_BATCH = 4096                    # rows per map_batches call
BENCHES = ("label", "distill", "store", "deepspeed")
QUICK_NOTE = " (a --quick smoke run: sizes far too small for the figures to mean anything)"


@dataclass
class Sizes:
    train_rows: int
    shard_rows: int
    val_rows: int
    test_rows: int
    tiny_shards: int
    tiny_shard_rows: int
    epochs: int
    repeats: int
    ds_warmup: int
    ds_steps: int


FULL = Sizes(train_rows=200_000, shard_rows=12_500, val_rows=10_000, test_rows=2_000, tiny_shards=2,
             tiny_shard_rows=256, epochs=10, repeats=3, ds_warmup=50, ds_steps=300)
QUICK = Sizes(train_rows=4_096, shard_rows=1_024, val_rows=1_024, test_rows=256, tiny_shards=2,
              tiny_shard_rows=128, epochs=1, repeats=1, ds_warmup=5, ds_steps=20)


def mflops(hidden: list[int], in_features: int = FEATURES, classes: int = CLASSES) -> float:
    """Forward MFLOP per row of an MLP: 2 x multiply-adds of its Linear layers (biases, ReLU left out)."""
    widths = [in_features, *hidden, classes]
    return 2 * sum(a * b for a, b in itertools.pairwise(widths)) / 1e6


def log(msg: str) -> None:
    print(f"[bench_speed {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- data and teachers -------------------------------------------------------------------------
def write_split(out: Path, rows: int, shard_rows: int, first_id: int, seed: int) -> list[tuple[str, int]]:
    """Parquet shards as ensemblekd.data.builtin.prepare writes them: id int64, x fixed_size_list<float>, y int64."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        x = rng.standard_normal((n, FEATURES), dtype=np.float32)
        table = pa.table({"id": pa.array(np.arange(first_id + start, first_id + start + n), pa.int64()),
                          "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), FEATURES),
                          "y": pa.array(rng.integers(0, CLASSES, n), pa.int64())})
        path = out / f"part-{i:05d}.parquet"
        pq.write_table(table, path)
        files.append((str(path), n))
    return files


def make_data(work: Path, s: Sizes) -> dict[str, Any]:
    import torch

    from ensemblekd.testing import mlp

    data = work / "data"
    splits = {"train": write_split(data / "train", s.train_rows, s.shard_rows, 0, 0),
              "val": write_split(data / "val", s.val_rows, s.shard_rows, 10**9, 1),
              "test": write_split(data / "test", s.test_rows, s.shard_rows, 2 * 10**9, 2),
              "tiny": write_split(data / "tiny", s.tiny_shards * s.tiny_shard_rows, s.tiny_shard_rows, 3 * 10**9, 3)}
    teachers = []
    for i, (name, hidden) in enumerate(TEACHERS.items()):
        torch.manual_seed(i)
        path = work / "teachers" / f"{name}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(mlp(FEATURES, CLASSES, hidden).state_dict(), path)
        teachers.append({"name": name, "hidden": hidden, "checkpoint": str(path)})
    return {"dir": str(data), "splits": splits, "teachers": teachers}


def load_teachers(specs: list[dict]) -> list[tuple[str, Any]]:
    import torch

    from ensemblekd.testing import mlp

    out = []
    for t in specs:
        model = mlp(FEATURES, CLASSES, t["hidden"])
        model.load_state_dict(torch.load(t["checkpoint"], map_location="cpu", weights_only=True))
        out.append((t["name"], model.eval()))
    return out


LAYOUTS = {  # teachers' label placement: the default, and the one before it, chosen with `group`
    "default": "automatic placement (the default: replicas 1, num_cpus 0.5; on 2 cores 2 actors × 3 teachers)",
    "per_teacher": "one pool per teacher (each teacher's group its own name; 3 actors × 1 teacher)",
}


def make_config(ctx: dict, train_dir: str, store: Path, output_dir: Path, epochs: int = 1, zero_stage: int = 0,
                layout: str = "default"):
    """The benchmark's config; the teachers placed as LAYOUTS[layout] says (default: --label-replicas
    and --label-num-cpus, placed automatically)."""
    import ensemblekd as ekd

    io = {"in_features": FEATURES, "num_classes": CLASSES}
    data = ctx["data"]["dir"]
    placed = {"default": lambda t: {"replicas": ctx["label_replicas"], "num_cpus": ctx["label_num_cpus"]},
              "per_teacher": lambda t: {"group": t["name"], "num_cpus": 0.5}}[layout]
    return ekd.load_config({
        "data": {"train": train_dir, "val": f"{data}/val", "test": f"{data}/test"},
        "teachers": [{"name": t["name"], "model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": t["hidden"]},
                      "checkpoint": t["checkpoint"], **placed(t), "batch_size": TEACHER_BATCH} for t in ctx["data"]["teachers"]],
        "store": {"uri": str(store), "dtype": "float16"},
        "student": {"model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": STUDENT_HIDDEN}},
        "distill": {"temperature": TEMPERATURE, "alpha": ALPHA},
        "trainer": {"num_workers": ctx["trainer_workers"], "cpus_per_worker": 0.5, "epochs": epochs, "batch_size": GLOBAL_BATCH,
                    "lr": LR, "zero_stage": zero_stage, "max_failures": 0, "output_dir": str(output_dir)},
        "ray": {"num_cpus": 2},
    }, check=False)


def start_ray() -> float:
    """A fresh local Ray on 127.0.0.1 with ensemblekd's settings (ensure_ray's, plus the address); seconds."""
    import logging

    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", logging_level=logging.WARNING,
             logging_config=ray.LoggingConfig(log_level="WARNING"))
    return time.perf_counter() - t0


def count_rows(files) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


# -- label: three ways ------------------------------------------------------------------------
def label_ensemblekd(ctx: dict, split: str, tag: str, layout: str = "default") -> float:
    from ensemblekd.stages.label import label

    store = Path(ctx["work"]) / "label" / tag
    shutil.rmtree(store, ignore_errors=True)
    cfg = make_config(ctx, f"{ctx['data']['dir']}/{split}", store, Path(ctx["work"]) / "label-out", layout=layout)
    t0 = time.perf_counter()
    result = label(cfg, splits=("train",), progress=False)
    seconds = time.perf_counter() - t0
    expected = sum(n for _, n in ctx["data"]["splits"][split]) * len(TEACHERS)
    assert result.rows == expected, (result, expected)
    if split == "train" and layout == "default":
        ctx["train_store"] = str(store)
    return seconds


def _plain_label_worker(shards: list[tuple[int, str]], teachers: list[dict], out: str) -> None:
    """One process of the plain loop: read each of its shards once, run the three teachers, write
    each teacher's logits as ensemblekd's label shard (tasks.classification.encode)."""
    import torch

    from ensemblekd.tasks.classification import encode

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    models = load_teachers(teachers)
    for index, path in shards:
        table = pq.read_table(path, columns=["id", "x"])
        col = table["x"].combine_chunks()
        x = torch.from_numpy(col.flatten().to_numpy().reshape(len(col), FEATURES))
        ids = table["id"].to_numpy()
        for name, model in models:
            with torch.inference_mode():
                logits = torch.cat([model(x[i:i + TEACHER_BATCH]) for i in range(0, len(x), TEACHER_BATCH)]).numpy()
            data, _ = encode(ids, logits, "float16")
            os.makedirs(f"{out}/{name}", exist_ok=True)
            with open(f"{out}/{name}/part-{index:05d}.parquet", "wb") as f:
                f.write(data)


def label_plain(ctx: dict, split: str, tag: str) -> float:
    import multiprocessing as mp

    out = Path(ctx["work"]) / "label" / tag
    shutil.rmtree(out, ignore_errors=True)
    shards = list(enumerate(path for path, _ in ctx["data"]["splits"][split]))
    spawn = mp.get_context("spawn")
    t0 = time.perf_counter()
    procs = [spawn.Process(target=_plain_label_worker, args=(shards[r::2], ctx["data"]["teachers"], str(out)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    seconds = time.perf_counter() - t0
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    rows = sum(n for _, n in ctx["data"]["splits"][split])
    for name in TEACHERS:
        assert count_rows(sorted((out / name).glob("*.parquet"))) == rows
    return seconds


class RayDataTeachers:
    """The Ray Data map_batches callable: one actor holds all three teachers (as a plain-loop
    process does), gets Arrow batches and returns id + one float16 logits column per teacher."""

    def __init__(self, teachers: list[dict]):
        import torch

        torch.set_num_threads(1)
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.models = load_teachers(teachers)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        col = batch["x"].combine_chunks()
        x = torch.from_numpy(col.flatten().to_numpy().reshape(len(col), FEATURES))
        out = {"id": batch["id"]}
        for name, model in self.models:
            with torch.inference_mode():
                logits = torch.cat([model(x[i:i + TEACHER_BATCH]) for i in range(0, len(x), TEACHER_BATCH)]).numpy()
            values = pa.array(logits.astype(np.float16).reshape(-1), pa.float16())
            out[f"logits_{name}"] = pa.FixedSizeListArray.from_arrays(values, CLASSES)
        return pa.table(out)


def label_raydata(ctx: dict, split: str, tag: str) -> float:
    """read_parquet -> map_batches(2 actors x 0.5 CPU, 1 thread each) -> write_parquet.

    Fair set-up on 2 CPUs: the two actors get the same 2 x 1 thread the plain loop has; read and
    write tasks ask for 0.25 CPU so they can always run beside the actors (whole-CPU actors, or
    whole-CPU read tasks beside them, leave nothing to schedule on 2 CPUs and hang); one block
    per input file (ensemblekd's unit of work too), so both actors get work even on few files;
    progress bars and the per-run stats log are off.
    """
    import ray.data

    out = Path(ctx["work"]) / "label" / tag
    shutil.rmtree(out, ignore_errors=True)
    dctx = ray.data.DataContext.get_current()
    dctx.enable_progress_bars = False
    dctx.enable_operator_progress_bars = False
    dctx.print_on_execution_start = False
    dctx.enable_auto_log_stats = False
    t0 = time.perf_counter()
    files = len(ctx["data"]["splits"][split])
    ds = ray.data.read_parquet(f"{ctx['data']['dir']}/{split}", num_cpus=0.25, override_num_blocks=files)
    ds = ds.select_columns(["id", "x"]).map_batches(
        RayDataTeachers, fn_constructor_args=(ctx["data"]["teachers"],), batch_size=RAYDATA_BATCH,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5)
    ds.write_parquet(str(out), ray_remote_args={"num_cpus": 0.25})
    seconds = time.perf_counter() - t0
    assert count_rows(sorted(out.glob("*.parquet"))) == sum(n for _, n in ctx["data"]["splits"][split])
    return seconds


def bench_label(ctx: dict) -> dict[str, Any]:
    """Per method and repeat: wall time on the full input and on a tiny one (the method's fixed
    start-up cost: workers, actors, planning); steady rows/s = (rows - tiny rows) / (full - tiny)."""
    s: Sizes = ctx["sizes"]
    methods = {"ensemblekd": label_ensemblekd,
               **{layout: functools.partial(label_ensemblekd, layout=layout) for layout in LAYOUTS if layout != "default"},
               "plain": label_plain, "raydata": label_raydata}
    rows = s.train_rows
    tiny_rows = s.tiny_shards * s.tiny_shard_rows
    for name, fn in methods.items() if s.repeats > 1 else ():  # warm-up, not timed: Ray's worker pool, imports
        fn(ctx, "tiny", f"warmup-{name}")
    raw: dict[str, dict[str, list[float]]] = {m: {"full_s": [], "tiny_s": []} for m in methods}
    for r in range(s.repeats):
        for name, fn in methods.items():
            raw[name]["tiny_s"].append(fn(ctx, "tiny", f"{name}-tiny-{r}"))
            raw[name]["full_s"].append(fn(ctx, "train", f"{name}-full-{r}"))
            log(f"label {name:10s} repeat {r}: {raw[name]['full_s'][-1]:.2f} s for {rows:,} rows "
                f"(tiny input: {raw[name]['tiny_s'][-1]:.2f} s)")
    out: dict[str, Any] = {"rows": rows, "tiny_rows": tiny_rows, "raw": raw}
    for name, r in raw.items():
        steady = [(rows - tiny_rows) / max(f - t, 1e-3) for f, t in zip(r["full_s"], r["tiny_s"])]
        out[name] = {"rows_per_s": statistics.median(steady),
                     "rows_per_s_with_startup": statistics.median(rows / f for f in r["full_s"]),
                     "startup_s": statistics.median(r["tiny_s"]), "wall_s": statistics.median(r["full_s"])}
    return out


# -- distill: offline (ensemblekd) against online and plain loops ----------------------------
def _read_input(path: str) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path, columns=["x", "y"])
    col = table["x"].combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), FEATURES), table["y"].to_numpy()


def _read_logits(path: str) -> np.ndarray:
    col = pq.read_table(path, columns=["logits"])["logits"].combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), CLASSES)


def plain_batches(job: dict, split: str, segments, batch: int, rng, with_logits: bool):
    """(x, y[, z]) numpy batches over a worker's segments: each shard read once with pyarrow, its
    rows shuffled, batches cut as views (only the batch that spans two shards is copied)."""
    left = None
    for shard, start, stop in segments:
        x, y = _read_input(job[split][shard][0])
        parts = [x[start:stop], y[start:stop]]
        if with_logits:
            parts.append(np.stack([_read_logits(files[shard])[start:stop] for files in job["labels"].values()], 1))
        if rng is not None:
            perm = rng.permutation(len(parts[1]))
            parts = [a[perm] for a in parts]
        n, off = len(parts[1]), 0
        if left is not None:
            need = batch - len(left[1])
            if n < need:
                left = [np.concatenate([a, b]) for a, b in zip(left, parts)]
                continue
            yield tuple(np.concatenate([a, b[:need]]) for a, b in zip(left, parts))
            off, left = need, None
        end = off + (n - off) // batch * batch
        for i in range(off, end, batch):
            yield tuple(a[i:i + batch] for a in parts)
        left = [a[end:] for a in parts] if end < n else None
    if left is not None:
        yield tuple(left)


def _dist_env(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))


def _train_worker(rank: int, world: int, port: int, job_path: str, result_path: str) -> None:
    """One rank of the plain DDP loops: for each repeat, hard labels, offline KD (stored logits)
    and online KD (the three teachers in every step), each for `epochs` epochs + val accuracy."""
    _dist_env(rank, world, port)
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from ensemblekd.losses import kd_loss
    from ensemblekd.tasks import worker_segments
    from ensemblekd.testing import mlp

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # read-only views, never written
    dist.init_process_group("gloo", rank=rank, world_size=world)
    job = json.loads(Path(job_path).read_text())
    teachers = [m for _, m in load_teachers(job["teachers"])]
    ready = time.time()
    micro = job["batch"] // world
    shard_rows = [n for _, n in job["train"]]
    val_segments = worker_segments([n for _, n in job["val"]], world, rank, 0, 0, shuffle=False, drop_remainder=False)
    results: list[dict] = []
    for rep in range(job["repeats"]):
        for variant in job["variants"]:
            torch.manual_seed(0)
            student = mlp(FEATURES, CLASSES, STUDENT_HIDDEN)
            model = DistributedDataParallel(student)
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
            epoch_s: list[float] = []
            dist.barrier()
            t_start = time.perf_counter()
            for epoch in range(job["epochs"]):
                t0 = time.perf_counter()
                model.train()
                rng = np.random.default_rng([0, epoch, rank])
                segments = worker_segments(shard_rows, world, rank, 0, epoch)
                for batch in plain_batches(job, "train", segments, micro, rng, with_logits=variant == "offline"):
                    x, y = torch.from_numpy(batch[0]), torch.from_numpy(batch[1])
                    if variant == "online":
                        with torch.no_grad():
                            z = torch.stack([t(x) for t in teachers], 1)
                    elif variant == "offline":
                        z = torch.from_numpy(batch[2]).float()
                    out = model(x)
                    if variant == "hard":
                        loss = F.cross_entropy(out, y)
                    else:
                        targets = F.softmax(z / TEMPERATURE, dim=-1).mean(1)  # uniform mix, probability space
                        loss = kd_loss(out, targets, y, TEMPERATURE, ALPHA).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                model.eval()
                counts = torch.zeros(2, dtype=torch.float64)
                with torch.no_grad():
                    for x, y in plain_batches(job, "val", val_segments, micro, None, with_logits=False):
                        pred = student(torch.from_numpy(x)).argmax(-1)
                        counts += torch.tensor([(pred == torch.from_numpy(y)).sum().item(), len(y)], dtype=torch.float64)
                dist.all_reduce(counts)
                epoch_s.append(time.perf_counter() - t0)
            total = time.perf_counter() - t_start
            results.append({"repeat": rep, "variant": variant, "epoch_s": epoch_s, "total_s": total,
                            "val_accuracy": counts[0].item() / max(counts[1].item(), 1.0)})
    if rank == 0:
        Path(result_path).write_text(json.dumps({"ready": ready, "results": results}))
    dist.destroy_process_group()


def run_plain_training(ctx: dict, store_uri: str) -> dict[str, Any]:
    import torch.multiprocessing as tmp

    from ensemblekd.store import Store

    s: Sizes = ctx["sizes"]
    store = Store.open(store_uri)
    n_train = len(ctx["data"]["splits"]["train"])
    job = {"train": ctx["data"]["splits"]["train"], "val": ctx["data"]["splits"]["val"],
           "labels": {t: [store.shard_uri("train", t, i) for i in range(n_train)] for t in TEACHERS},
           "teachers": ctx["data"]["teachers"], "epochs": s.epochs, "repeats": s.repeats, "batch": GLOBAL_BATCH,
           "variants": ["hard", "offline", "online"]}
    work = Path(ctx["work"])
    (work / "plain_job.json").write_text(json.dumps(job))
    result_path = work / "plain_result.json"
    spawned = time.time()
    tmp.spawn(_train_worker, args=(WORKERS, free_port(), str(work / "plain_job.json"), str(result_path)), nprocs=WORKERS)
    out = json.loads(result_path.read_text())
    out["startup_s"] = out.pop("ready") - spawned
    return out


def bench_distill(ctx: dict) -> dict[str, Any]:
    """Each repeat: a fresh store, label (train + val), ensemblekd distill; then the plain loops
    (one pair of processes runs every variant and repeat, interleaved)."""
    from ensemblekd.stages.distill import distill
    from ensemblekd.stages.label import label

    s: Sizes = ctx["sizes"]
    work = Path(ctx["work"])
    offline: list[dict] = []
    for r in range(s.repeats):
        store = work / "distill" / f"store-{r}"
        shutil.rmtree(store, ignore_errors=True)
        cfg = make_config(ctx, f"{ctx['data']['dir']}/train", store, work / "distill" / f"out-{r}", epochs=s.epochs)
        t0 = time.perf_counter()
        label(cfg, splits=("train", "val"), progress=False)
        label_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = distill(cfg, None, progress=False)
        distill_s = time.perf_counter() - t0
        offline.append({"label_s": label_s, "distill_s": distill_s, "fit_s": result.seconds,
                        "epoch_s": result.metrics["epoch_seconds"], "val_accuracy": result.metrics["val_accuracy"]})
        ctx["labelled_store"] = str(store)
        log(f"distill ensemblekd repeat {r}: label {label_s:.1f} s, distill {distill_s:.1f} s "
            f"({s.epochs} epochs, last epoch {offline[-1]['epoch_s']:.2f} s)")
    plain = run_plain_training(ctx, ctx["labelled_store"])
    for res in plain["results"]:
        log(f"distill plain {res['variant']:8s} repeat {res['repeat']}: {res['total_s']:.1f} s "
            f"({s.epochs} epochs, last epoch {res['epoch_s'][-1]:.2f} s)")

    def med(variant: str, key: str) -> float:
        vals = [x[key] if key != "epoch_s" else x["epoch_s"][-1] for x in plain["results"] if x["variant"] == variant]
        return statistics.median(vals)

    ray_init_s = ctx.get("ray_init_s", 0.0)
    e2e = [ray_init_s + o["label_s"] + o["distill_s"] for o in offline]
    return {
        "epochs": s.epochs, "ray_init_s": ray_init_s, "offline_raw": offline, "plain_raw": plain["results"],
        "plain_startup_s": plain["startup_s"],
        "ensemblekd": {"epoch_s": statistics.median(o["epoch_s"] for o in offline),
                       "label_s": statistics.median(o["label_s"] for o in offline),
                       "distill_s": statistics.median(o["distill_s"] for o in offline),
                       "end_to_end_s": statistics.median(e2e)},
        "plain": {v: {"epoch_s": med(v, "epoch_s"), "total_s": med(v, "total_s")} for v in ("hard", "offline", "online")},
        "online_end_to_end_s": plain["startup_s"] + med("online", "total_s"),
    }


# -- store: the trainer's reader against bare pyarrow; bytes per row --------------------------
def bench_store(ctx: dict) -> dict[str, Any]:
    import torch

    from ensemblekd.store import Store
    from ensemblekd.tasks import get_task, worker_segments

    s: Sizes = ctx["sizes"]
    uri = ctx.get("train_store") or ctx.get("labelled_store")
    if uri is None:
        label_ensemblekd(ctx, "train", "store-bench")
        uri = ctx["train_store"]
    cfg = make_config(ctx, f"{ctx['data']['dir']}/train", Path(uri), Path(ctx["work"]) / "store-out")
    store = Store.open(uri)
    names = list(TEACHERS)
    shard_rows = [x["rows"] for x in store.inputs("train")]
    rows = sum(shard_rows)
    micro = GLOBAL_BATCH // WORKERS
    torch.set_num_threads(1)
    reader, bare = [], []
    for r in range(2 * s.repeats + 2):  # reader and bare pyarrow alternate; the first pass of each is a warm-up
        t0 = time.perf_counter()
        seen = 0
        segments = worker_segments(shard_rows, 1, 0, 0, 0)
        for x, y, z, _ in get_task(cfg.task).batches(cfg, store, "train", names, segments, micro,
                                                   np.random.default_rng([0, 0, 0])):
            seen += len(y)
        reader_s = time.perf_counter() - t0
        assert seen == rows and z.shape[1:] == (len(names), CLASSES), (seen, z.shape)
        t0 = time.perf_counter()
        seen = 0
        for i, shard in enumerate(store.inputs("train")):
            _, y = _read_input(shard["uri"])
            z = [_read_logits(store.shard_uri("train", name, i)) for name in names]
            seen += len(y)
        bare_s = time.perf_counter() - t0
        assert seen == rows
        if r > 0:
            reader.append(rows / reader_s)
            bare.append(rows / bare_s)
            log(f"store: reader {reader[-1]:,.0f} rows/s, bare pyarrow {bare[-1]:,.0f} rows/s")
    entries = [e for name in names for e in store.manifest["shards"]["train"][name].values()]
    label_bytes = sum(e["bytes"] for e in entries)
    theoretical = sum(e["rows"] * (CLASSES * 2 + 8) for e in entries)  # float16 logits + int64 id, per teacher shard row
    return {"rows": rows, "reader_rows_per_s": statistics.median(reader), "bare_rows_per_s": statistics.median(bare),
            "reader_raw": reader, "bare_raw": bare, "label_bytes": label_bytes, "theoretical_bytes": theoretical,
            "bytes_per_row": label_bytes / rows, "theoretical_bytes_per_row": theoretical / rows}


# -- deepspeed: the student's step under each ZeRO stage against plain DDP --------------------
def _step_worker(rank: int, world: int, port: int, job_path: str, result_path: str) -> None:
    """Every configuration in one pair of processes, interleaved across repeats: a fresh student,
    warm-up steps, then timed steps (the slowest rank's time); same data, loss and optimizer."""
    _dist_env(rank, world, port)
    import gc

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed's renamed collectives, per step

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from ensemblekd.config import TrainerConfig
    from ensemblekd.losses import kd_loss
    from ensemblekd.stages.train import deepspeed_config
    from ensemblekd.testing import mlp

    job = json.loads(Path(job_path).read_text())
    micro = job["batch"] // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(micro, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (micro,), generator=g)
    targets = F.softmax(torch.randn(micro, CLASSES, generator=g), -1)
    total = job["warmup"] + job["steps"]

    def scheduler(opt):  # stages/train.py's cosine schedule
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))

    def make_step(config: str):
        """A fresh student and its one training step under `config`; returns (step, engine or None)."""
        torch.manual_seed(0)
        model = mlp(FEATURES, CLASSES, STUDENT_HIDDEN)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        if config == "ddp":
            ddp, sched = DistributedDataParallel(model), scheduler(opt)

            def ddp_step():
                loss = kd_loss(ddp(x), targets, y, TEMPERATURE, ALPHA).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            return ddp_step, None
        ds_config = deepspeed_config(TrainerConfig(num_workers=world, batch_size=job["batch"], zero_stage=int(config[4])))
        if config.endswith("_clip"):  # DeepSpeed's own default, which ensemblekd's config used to leave on
            ds_config["gradient_clipping"] = 1.0
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), optimizer=opt,
                                               lr_scheduler=scheduler, config=ds_config)

        def ds_step():
            loss = kd_loss(engine(x), targets, y, TEMPERATURE, ALPHA).loss
            engine.backward(loss)
            engine.step()
        return ds_step, engine

    times: dict[str, list[float]] = {c: [] for c in job["configs"]}
    for _ in range(job["repeats"]):
        for c in job["configs"]:
            step, engine = make_step(c)
            for _ in range(job["warmup"]):
                step()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(job["steps"]):
                step()
            dist.barrier()
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[c].append(1000 * elapsed.item() / job["steps"])
            if engine is not None and hasattr(engine, "destroy"):
                engine.destroy()
            del step, engine
            gc.collect()
    if rank == 0:
        Path(result_path).write_text(json.dumps(times))
    dist.destroy_process_group()


def bench_deepspeed(ctx: dict) -> dict[str, Any]:
    import torch.multiprocessing as tmp

    s: Sizes = ctx["sizes"]
    work = Path(ctx["work"])
    job = {"configs": ["ddp", "zero0", "zero1", "zero2", "zero3", "zero0_clip"], "repeats": s.repeats, "warmup": s.ds_warmup,
           "steps": s.ds_steps, "batch": GLOBAL_BATCH}
    (work / "ds_job.json").write_text(json.dumps(job))
    tmp.spawn(_step_worker, args=(WORKERS, free_port(), str(work / "ds_job.json"), str(work / "ds_result.json")),
              nprocs=WORKERS)
    raw = json.loads((work / "ds_result.json").read_text())
    for c, ms in raw.items():
        log(f"deepspeed {c}: {', '.join(f'{v:.2f}' for v in ms)} ms/step")
    return {"raw_ms": raw, "ms": {c: statistics.median(v) for c, v in raw.items()}, **job}


# -- the table ----------------------------------------------------------------------------------
def fmt(value: float, unit: str) -> str:
    if unit == "rows/s":
        return f"{value:,.0f} rows/s"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "B/row":
        return f"{value:.1f} B/row"
    return f"{value:g} {unit}"


def row(stage: str, key: str, what: str, ens: float, base: float, unit: str, ratio: float,
        target: tuple[str, float] | None) -> dict[str, Any]:
    met = None if target is None else (ratio >= target[1] if target[0] == ">=" else ratio <= target[1])
    return {"stage": stage, "key": key, "what": what, "ensemblekd": ens, "baseline": base, "unit": unit,
            "ratio": ratio, "target": None if target is None else f"{'≥' if target[0] == '>=' else '≤'} {target[1]:g}×",
            "met": met}


def label_layout_rows(lb: dict[str, Any]) -> list[dict[str, Any]]:
    """ensemblekd label with the teachers placed by `group` (LAYOUTS), for reference: no targets."""
    p, d = lb["plain"], lb["raydata"]
    out = []
    for layout in (k for k in LAYOUTS if k != "default" and k in lb):
        g = lb[layout]
        what = f"rows/s, start-up {{}}: ensemblekd label, {LAYOUTS[layout]}, vs {{}}"
        out += [
            row("label", f"{layout}_vs_plain", what.format("excluded", "plain loop"), g["rows_per_s"], p["rows_per_s"],
                "rows/s", g["rows_per_s"] / p["rows_per_s"], None),
            row("label", f"{layout}_vs_raydata", what.format("excluded", "Ray Data"), g["rows_per_s"], d["rows_per_s"],
                "rows/s", g["rows_per_s"] / d["rows_per_s"], None),
            row("label", f"{layout}_vs_plain_wall", what.format("included", "plain loop"), g["rows_per_s_with_startup"],
                p["rows_per_s_with_startup"], "rows/s", g["rows_per_s_with_startup"] / p["rows_per_s_with_startup"], None),
            row("label", f"{layout}_vs_raydata_wall", what.format("included", "Ray Data"), g["rows_per_s_with_startup"],
                d["rows_per_s_with_startup"], "rows/s", g["rows_per_s_with_startup"] / d["rows_per_s_with_startup"], None),
        ]
    return out


def table_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    if "label" in res:
        lb = res["label"]
        e, p, d = lb["ensemblekd"], lb["plain"], lb["raydata"]
        rows += [
            row("label", "label_vs_plain", "rows/s, start-up excluded: ensemblekd label (default placement) vs plain torch loop "
                "(2 processes × 1 thread); ratio = ensemblekd / plain", e["rows_per_s"], p["rows_per_s"], "rows/s",
                e["rows_per_s"] / p["rows_per_s"], (">=", 0.8)),
            row("label", "label_vs_raydata", "rows/s, start-up excluded: ensemblekd label (default placement) vs Ray Data read_parquet → "
                "map_batches(2 actors) → write_parquet; ratio = ensemblekd / Ray Data", e["rows_per_s"], d["rows_per_s"],
                "rows/s", e["rows_per_s"] / d["rows_per_s"], (">=", 1.5)),
            row("label", "label_vs_plain_wall", "rows/s, start-up included (stage wall time, Ray start apart): ensemblekd "
                "vs plain loop", e["rows_per_s_with_startup"], p["rows_per_s_with_startup"], "rows/s",
                e["rows_per_s_with_startup"] / p["rows_per_s_with_startup"], (">=", 0.8)),
            row("label", "label_vs_raydata_wall", "rows/s, start-up included (stage wall time, Ray start apart): "
                "ensemblekd vs Ray Data", e["rows_per_s_with_startup"], d["rows_per_s_with_startup"], "rows/s",
                e["rows_per_s_with_startup"] / d["rows_per_s_with_startup"], (">=", 1.5)),
            *label_layout_rows(lb),
            row("label", "label_startup_vs_plain", "start-up (the same run on a 2-shard tiny input): ensemblekd vs plain "
                "loop; ratio = ensemblekd / plain", e["startup_s"], p["startup_s"], "s", e["startup_s"] / p["startup_s"],
                None),
            row("label", "label_startup_vs_raydata", "start-up (the same run on a 2-shard tiny input): ensemblekd vs "
                "Ray Data; ratio = ensemblekd / Ray Data", e["startup_s"], d["startup_s"], "s",
                e["startup_s"] / d["startup_s"], None),
        ]
    if "distill" in res:
        ds = res["distill"]
        e, p, n = ds["ensemblekd"], ds["plain"], ds["epochs"]
        rows += [
            row("distill", "offline_vs_online_epoch", "s per epoch: offline KD (ensemblekd distill: Ray Train 2 × 0.5 CPU, "
                "DeepSpeed ZeRO-0, from the store) vs online KD (plain 2-process DDP, 3 teachers in every step); "
                "ratio = online / offline", e["epoch_s"], p["online"]["epoch_s"], "s",
                p["online"]["epoch_s"] / e["epoch_s"], (">=", 5.0)),
            row("distill", "end_to_end", f"end to end, {n} epoch(s): Ray start + label (train, val) + ensemblekd "
                f"distill vs online KD (process start + {n} epoch(s)); ratio = online / ensemblekd", e["end_to_end_s"],
                ds["online_end_to_end_s"], "s", ds["online_end_to_end_s"] / e["end_to_end_s"], (">=", 4.0)),
            row("distill", "cached_vs_online_plain", "s per epoch, cached targets vs online teachers: plain DDP loop on "
                "the stored logits vs the same loop running the teachers; ratio = online / cached",
                p["offline"]["epoch_s"], p["online"]["epoch_s"], "s", p["online"]["epoch_s"] / p["offline"]["epoch_s"],
                None),
            row("distill", "trainer_overhead", "s per epoch, Ray Train + DeepSpeed + the store reader: ensemblekd "
                "distill vs the plain DDP loop on the same stored logits; ratio = ensemblekd / plain (× slower)",
                e["epoch_s"], p["offline"]["epoch_s"], "s", e["epoch_s"] / p["offline"]["epoch_s"], ("<=", 1.05)),
            row("distill", "kd_vs_hard", "s per epoch, what distillation costs: ensemblekd distill vs plain DDP "
                "hard-label training (CE only, no teachers); ratio = ensemblekd / hard (× slower)", e["epoch_s"],
                p["hard"]["epoch_s"], "s", e["epoch_s"] / p["hard"]["epoch_s"], None),
            row("distill", "plain_kd_vs_hard", "s per epoch, plain loops: offline KD on stored logits vs hard labels; "
                "ratio = KD / hard (× slower)", p["offline"]["epoch_s"], p["hard"]["epoch_s"], "s",
                p["offline"]["epoch_s"] / p["hard"]["epoch_s"], None),
        ]
    if "store" in res:
        st = res["store"]
        rows += [
            row("store", "reader_vs_pyarrow", "read rows/s: the trainer's reader (task.batches, inputs + 3 "
                "teachers' logits, batch 128) vs bare pyarrow.parquet.read_table of the same files to numpy; "
                "ratio = reader / bare", st["reader_rows_per_s"], st["bare_rows_per_s"], "rows/s",
                st["reader_rows_per_s"] / st["bare_rows_per_s"], (">=", 0.95)),
            row("store", "bytes_per_row", "label-store bytes per input row vs theoretical 3 teachers × (10 classes × "
                "2 B float16 + 8 B id); ratio = store / theoretical", st["bytes_per_row"],
                st["theoretical_bytes_per_row"], "B/row", st["bytes_per_row"] / st["theoretical_bytes_per_row"],
                ("<=", 1.1)),
        ]
    if "deepspeed" in res:
        ms = res["deepspeed"]["ms"]
        for stage in range(4):
            rows.append(row("deepspeed", f"zero{stage}_vs_ddp", f"student step, global batch {GLOBAL_BATCH} on 2 "
                            f"processes: DeepSpeed ZeRO-{stage} vs plain torch DDP + AdamW; ratio = DeepSpeed / DDP",
                            ms[f"zero{stage}"], ms["ddp"], "ms", ms[f"zero{stage}"] / ms["ddp"],
                            ("<=", 1.25) if stage <= 1 else None))
        rows.append(row("deepspeed", "zero0_clip_vs_ddp", "before/after: ZeRO-0 with DeepSpeed's default gradient_clipping "
                        "1.0 (ensemblekd's config before it set 0: a norm and a second all-reduce per step) vs DDP; "
                        "ratio = DeepSpeed / DDP", ms["zero0_clip"], ms["ddp"], "ms", ms["zero0_clip"] / ms["ddp"], None))
    return rows


def break_even(ds: dict[str, Any], target: float = 4.0) -> str:
    """End to end against online KD as a function of epochs E, from the measured fixed costs and
    per-epoch times: (F_on + E e_on) / (F_ens + E e_off)."""
    n, e_off, e_on = ds["epochs"], ds["ensemblekd"]["epoch_s"], ds["plain"]["online"]["epoch_s"]
    f_ens = ds["ensemblekd"]["end_to_end_s"] - n * e_off
    f_on = ds["online_end_to_end_s"] - n * e_on
    text = (f"End to end as a function of epochs E: (online fixed {f_on:.1f} s + E × {e_on:.2f} s) / (ensemblekd fixed "
            f"{f_ens:.1f} s + E × {e_off:.2f} s); it tends to {e_on / e_off:.2f}× for many epochs")
    if e_on > target * e_off:
        text += f" and reaches {target:g}× from about E = {max(math.ceil((target * f_ens - f_on) / (e_on - target * e_off)), 1)}"
    else:
        text += f", so never reaches {target:g}× with these per-epoch times"
    return text + " (a projection, not a measurement)."


def markdown(res: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from ensemblekd.testing import markdown_table

    m, st = res["machine"], res["settings"]
    lines = [
        "# Speed, side by side",
        "",
        (f"Generated by `python tools/bench_speed.py{' --quick' if st['quick'] else ''}` on {m['date']} in "
         f"{res['minutes']:.1f} min{QUICK_NOTE if st['quick'] else ''}."),
        (f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']:.0f} GiB; Python {m['python']}, "
         f"torch {m['torch']}, Ray {m['ray']}, DeepSpeed {m['deepspeed']}, pyarrow {m['pyarrow']}."),
        f"Data: {st['train_rows']:,} train rows × {FEATURES} float32 features, {CLASSES} classes, shards of "
        f"{st['shard_rows']:,} rows; {st['val_rows']:,} val rows. Teachers (random init): "
        + ", ".join(f"{n} mlp{h} {mflops(h):.2f} MFLOP/row" for n, h in TEACHERS.items())
        + f"; student mlp{STUDENT_HIDDEN} {mflops(STUDENT_HIDDEN):.3f} MFLOP/row "
        f"(each teacher ≥ {min(mflops(h) for h in TEACHERS.values()) / mflops(STUDENT_HIDDEN):.0f}× the student). "
        f"Median of {st['repeats']} repeat(s); {st['epochs']} epoch(s); global batch {GLOBAL_BATCH}.",
        "",
        markdown_table(["stage", "what is measured", "ensemblekd", "baseline", "ratio", "target", "met"],
                       [[r["stage"], r["what"], fmt(r["ensemblekd"], r["unit"]), fmt(r["baseline"], r["unit"]),
                         f"{r['ratio']:.2f}×", r["target"] or "—",
                         "—" if r["met"] is None else ("yes" if r["met"] else "**no**")] for r in rows], left=2),
    ]
    extra = []
    if "ray_init_s" in res:
        extra.append(f"Ray start (local, 2 CPUs), paid once per session and not in the label rows: {res['ray_init_s']:.2f} s.")
    if "label" in res:
        lb = res["label"]
        extra.append("Label start-up = wall time of the same method on a tiny input (" f"{lb['tiny_rows']} rows): "
                     + ", ".join(f"{k} {lb[k]['startup_s']:.2f} s" for k in lb if isinstance(lb[k], dict) and "startup_s" in lb[k])
                     + f"; wall time on {lb['rows']:,} rows: "
                     + ", ".join(f"{k} {lb[k]['wall_s']:.2f} s" for k in lb if isinstance(lb[k], dict) and "wall_s" in lb[k]) + ".")
    if "distill" in res:
        ds = res["distill"]
        e = ds["ensemblekd"]
        extra.append(f"Distill, {ds['epochs']} epoch(s): ensemblekd label {e['label_s']:.2f} s + distill wall "
                     f"{e['distill_s']:.2f} s (of which about {max(e['distill_s'] - ds['epochs'] * e['epoch_s'], 0):.1f} s "
                     f"is Ray Train and DeepSpeed start-up, checkpoints and reports); plain loops' process start "
                     f"{ds['plain_startup_s']:.2f} s; "
                     + ", ".join(f"plain {v} {ds['plain'][v]['total_s']:.2f} s" for v in ("hard", "offline", "online")) + ".")
    if "distill" in res:
        extra.append(break_even(res["distill"]))
    if "deepspeed" in res:
        ms = res["deepspeed"]["ms"]
        extra.append("Student step, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
                     + f" ({res['deepspeed']['steps']} timed steps after {res['deepspeed']['warmup']} warm-up).")
    if "deepspeed" in res and "distill" in res:
        ms, ds = res["deepspeed"]["ms"], res["distill"]
        steps = res["settings"]["train_rows"] // GLOBAL_BATCH
        gap = ds["ensemblekd"]["epoch_s"] - ds["plain"]["offline"]["epoch_s"]
        own = (ms["zero0"] - ms["ddp"]) * steps / 1000
        extra.append(f"Of the distill epoch's {gap:.2f} s over the plain DDP loop, DeepSpeed's own step (ZeRO-0 "
                     f"{ms['zero0']:.2f} ms against DDP {ms['ddp']:.2f} ms, × {steps} steps) accounts for {own:.2f} s; "
                     f"the rest, {gap - own:.2f} s ({100 * (gap - own) / ds['plain']['offline']['epoch_s']:.0f}% of the "
                     "plain epoch), is Ray Train, the store reader and the strategy.")
    if "store" in res:
        st = res["store"]
        extra.append(f"Store: {st['label_bytes']:,} bytes of label shards for {st['rows']:,} rows "
                     f"(theoretical {st['theoretical_bytes']:,}).")
    lines += ["", *[f"- {x}" for x in extra]]
    lines += ["", ("Definitions: rows/s = input rows labelled by all three teachers per second; start-up excluded = "
                   "(rows − tiny rows) / (wall − tiny-input wall). Per epoch = the last epoch's training plus validation "
                   "time (ensemblekd: its `epoch_seconds` metric; checkpointing excluded in both). Targets are ratios on "
                   "this machine; `met` compares the median ratio with the target.")]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    import deepspeed
    import ray
    import torch

    from ensemblekd import testing

    return testing.machine(torch=torch.__version__, ray=ray.__version__, deepspeed=deepspeed.__version__, pyarrow=pa.__version__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tools/results", help="where speed.md and speed.json go (default tools/results)")
    p.add_argument("--quick", action="store_true", help="smoke test: a few thousand rows, 1 repeat, 1 epoch")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 3; --quick 1)")
    p.add_argument("--epochs", type=int, default=None, help="distill epochs (default 10; --quick 1)")
    p.add_argument("--rows", type=int, default=None, help="train rows (default 200000; --quick 4096)")
    p.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--label-replicas", type=int, default=1, help="ensemblekd label: actors per teacher (default 1)")
    p.add_argument("--label-num-cpus", type=float, default=0.5, help="ensemblekd label: Ray CPUs per actor (default 0.5)")
    p.add_argument("--trainer-workers", type=int, default=WORKERS,
                   help=f"ensemblekd distill: Ray Train workers (default {WORKERS}; the plain loops keep {WORKERS} processes)")
    p.add_argument("--work", default=None, help="directory for data and stores (default: a temporary one, removed)")
    args = p.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = set(only) - set(BENCHES)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; choose from {','.join(BENCHES)}")
    sizes = Sizes(**asdict(QUICK if args.quick else FULL))
    for key, value in (("repeats", args.repeats), ("epochs", args.epochs), ("train_rows", args.rows)):
        if value is not None:
            setattr(sizes, key, value)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="ekd-bench-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    res: dict[str, Any] = {"machine": machine(), "settings": {"quick": args.quick, **asdict(sizes), "only": only,
                                                              "label_replicas": args.label_replicas,
                                                              "label_num_cpus": args.label_num_cpus,
                                                              "trainer_workers": args.trainer_workers,
                                                              "global_batch": GLOBAL_BATCH, "teacher_batch": TEACHER_BATCH,
                                                              "raydata_batch": RAYDATA_BATCH},
                           "flops": {"teachers_mflop_per_row": {n: mflops(h) for n, h in TEACHERS.items()},
                                     "student_mflop_per_row": mflops(STUDENT_HIDDEN)}}
    log("teachers: " + ", ".join(f"{n} {mflops(h):.2f} MFLOP/row" for n, h in TEACHERS.items())
        + f"; student {mflops(STUDENT_HIDDEN):.3f} MFLOP/row")
    try:
        t0 = time.perf_counter()
        ctx: dict[str, Any] = {"work": str(work), "sizes": sizes, "data": make_data(work, sizes),
                               "label_replicas": args.label_replicas, "label_num_cpus": args.label_num_cpus,
                               "trainer_workers": args.trainer_workers}
        log(f"data: {sizes.train_rows:,} train rows in {work} ({time.perf_counter() - t0:.1f} s)")
        for path, _ in ctx["data"]["splits"]["train"]:  # into the page cache before anything is timed
            Path(path).read_bytes()
        if "deepspeed" in only:  # first, before Ray's processes exist
            res["deepspeed"] = bench_deepspeed(ctx)
        if {"label", "distill", "store"} & set(only):
            import ray

            try:
                res["ray_init_s"] = ctx["ray_init_s"] = start_ray()
                log(f"Ray started in {res['ray_init_s']:.2f} s ({ray.available_resources().get('CPU')} CPUs)")
                for name, fn in (("label", bench_label), ("distill", bench_distill), ("store", bench_store)):
                    if name in only:
                        t0 = time.perf_counter()
                        res[name] = fn(ctx)
                        log(f"{name}: done in {time.perf_counter() - t0:.0f} s")
            finally:
                ray.shutdown()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    res["minutes"] = (time.perf_counter() - start) / 60
    from ensemblekd.testing import write_results

    rows = table_rows(res)
    write_results(out, "speed", res, rows, markdown(res, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
