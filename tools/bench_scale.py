"""How ensemblekd's cost grows with the work: label and distill seconds per million rows as rows,
teachers and shards grow, and the driver's manifest work as shards and teachers grow.

label   `ensemblekd.label` on a local Ray (2 teachers, small MLPs with random weights, 16 features,
        10 classes, 10,000-row shards, default placement) at 10^4, 10^5 and 10^6 rows (--max-rows
        10000000 for 10^7): seconds, seconds per million rows (total, and marginal: against the
        size before), the driver's peak RSS and the label actors' (sampled from the process table).
distill two epochs of `ensemblekd distill` from each of those stores up to --distill-max-rows (10^6):
        seconds with start-up, and the second epoch's own seconds per million rows; peak RSS.
teachers  10^6 rows labelled by 1, 2, 4 and 8 teachers (the two shapes alternating): seconds per
        million rows x teachers, and the actors default placement chose.
shards  10^5 rows in 10, 100, 1,000 and 10,000 shards, 2 teachers: what each shard costs beyond
        its rows.
manifest  the label driver's bookkeeping at 10 -> 10,000 shards and 1 -> 8 teachers, with the real
        Store on local disk: every shard committed as the label loop commits it, saved as the loop
        saves it (about once a second), against a label stage whose length is the measured label
        cost per shard and teacher (from `label`, or --entry-seconds). Designs side by side:
        the manifest written whole at each save (before), the commit log (each save appends only
        the new entries; the manifest is written whole at the start and the end), and with
        --delta a Delta Lake table (`pip install deltalake`) appended at each save. Reported:
        seconds of manifest work, its share of the label stage, bytes written, driver peak RSS.

    .venv/bin/python tools/bench_scale.py --delta --max-rows 10000000   # all, ~20 min on 2 cores
    .venv/bin/python tools/bench_scale.py --quick         # smoke test: small sizes only

Internals measured directly:
  ensemblekd.stages.label: timed on train alone (splits=); ekd.label also labels val and test and checks the config
  ensemblekd.stages.distill: timed without MLflow; ekd.distill logs every epoch and the student inside the time
  ensemblekd.store: the manifest part drives the real Store's commits, saves and a reader's Store.open
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

SHARD_ROWS = 10_000
SAVE_EVERY_S = 1.0  # the label loop's cadence (stages/label.py)
WHOLE_MAX_ENTRIES = 8_000  # the before-design is run up to here


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


# -- label: rows grow -----------------------------------------------------------------------------
def synthetic(out: Path, rows: int, features: int = 16, classes: int = 10, shard_rows: int = SHARD_ROWS) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(classes, features)).astype(np.float32)
    for split, n in (("train", rows), ("val", 2_000), ("test", 2_000)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for start in range(0, n, shard_rows):
            m = min(shard_rows, n - start)
            y = rng.integers(0, classes, m)
            x = centers[y] + rng.normal(size=(m, features)).astype(np.float32)
            table = pa.table({"id": np.arange(start, start + m, dtype=np.int64),
                              "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), features).cast(
                                  pa.list_(pa.float32())), "y": y.astype(np.int64)})
            pq.write_table(table, out / split / f"part-{start // shard_rows:05d}.parquet")


TEACHER_SHAPES = [("wide", [256]), ("deep", [128, 128])]


def label_config(work: Path, data: Path, store: str, teachers: int = 2) -> dict[str, Any]:
    """Teachers alternate between the two shapes (wide, deep, wide_2, deep_2, ...): the same work per
    teacher whatever their number; default placement (they share actors, stages/placement.py)."""
    shapes = [(name if k < 2 else f"{name}_{k // 2 + 1}", hidden)
              for k, (name, hidden) in ((k, TEACHER_SHAPES[k % 2]) for k in range(teachers))]
    configs = []
    for name, hidden in shapes:
        configs.append({"name": name, "model": "ensemblekd.models:mlp",
                         "kwargs": {"in_features": 16, "num_classes": 10, "hidden": hidden},
                        "checkpoint": str(work / f"{name}.pt"), "num_cpus": 0.5, "batch_size": 4096})
    return {"data": {"train": str(data / "train"), "val": str(data / "val"), "test": str(data / "test")},
            "teachers": configs, "store": {"uri": store},
            "student": {"model": "ensemblekd.models:mlp", "kwargs": {"in_features": 16, "num_classes": 10}},
            "trainer": {"output_dir": str(work / "out")}, "ray": {"num_cpus": 2}}


class WorkerRss:
    """Peak RSS of Ray's label actors and Train workers, sampled from the process table (they are
    other processes: their own peak is not visible from here) every 0.2 s while the block runs."""

    NAMES = ("ray::TeacherWorker", "ray::RayTrainWorker")

    def __enter__(self):
        import threading

        self.peak_mb, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = proc.info["cmdline"] or []
                if cmd and cmd[0].startswith(self.NAMES) and proc.info["memory_info"]:
                    self.peak_mb = max(self.peak_mb, proc.info["memory_info"].rss / 2**20)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def label_run(work: Path, rows: int, teachers: int = 2, shard_rows: int = SHARD_ROWS, with_val: bool = False):
    """Synthetic data and a fresh store; the train split labelled (and val, for distill). Returns the
    config and its row: seconds, per million rows (and per million rows x teachers), per shard x
    teacher, driver and worker peak RSS. The caller removes work/data and work/store."""
    import torch

    import ensemblekd as ekd
    from ensemblekd import testing
    from ensemblekd.stages.label import label

    for path in (work / "data", work / "store"):
        shutil.rmtree(path, ignore_errors=True)
    synthetic(work / "data", rows, shard_rows=shard_rows)
    cfg = ekd.load_config(label_config(work, work / "data", str(work / "store"), teachers), check=False)
    for t in cfg.teachers:  # random weights: the cost of labelling does not depend on them
        if not os.path.exists(t.checkpoint):
            torch.manual_seed(0)
            testing.save_state(testing.build_module(t.model, t.kwargs), t.checkpoint)
    gc.collect()
    with WorkerRss() as workers:
        start = time.perf_counter()
        result = label(cfg, splits=("train",), progress=False)
        seconds = time.perf_counter() - start
    if with_val:
        label(cfg, splits=("val",), progress=False)
    shards = -(-rows // shard_rows)
    row = {"bench": "label", "rows": rows, "shards": shards, "teachers": teachers, "seconds": seconds,
           "s_per_million_rows": seconds / rows * 1e6, "s_per_million_teacher_rows": seconds / (rows * teachers) * 1e6,
           "s_per_shard_teacher": seconds / result.shards, "actors": result.actors,
           "driver_peak_rss_mb": peak_rss_mb(), "worker_peak_rss_mb": workers.peak_mb}
    return cfg, row


def bench_label(work: Path, sizes: list[int], distill_max_rows: int) -> list[dict[str, Any]]:
    """Label each size's train split (and val, which distill needs), then, up to distill_max_rows,
    distil two epochs from it."""
    rows_out = []
    for rows in sizes:
        cfg, row = label_run(work, rows, with_val=rows <= distill_max_rows)
        previous = next((r for r in reversed(rows_out) if r["bench"] == "label"), None)
        row["marginal_s_per_million_rows"] = ((row["seconds"] - previous["seconds"]) / (rows - previous["rows"]) * 1e6
                                              if previous else None)
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        if rows <= distill_max_rows:
            rows_out.append(bench_distill(cfg, rows, [r for r in rows_out if r["bench"] == "distill"]))
    return rows_out


def bench_label_shape(work: Path, rows: int, grid: list[tuple[int, int]], bench: str) -> list[dict[str, Any]]:
    """Label `rows` rows for each (teachers, shard rows) of grid: the cost as teachers, or shards, grow.
    Ray is started first, by an untimed run, so that the first row does not pay for it."""
    import ray

    if not ray.is_initialized():
        label_run(work, SHARD_ROWS)
    out = []
    for teachers, shard_rows in grid:
        _, row = label_run(work, rows, teachers, shard_rows)
        row["bench"] = bench
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def bench_distill(cfg, rows: int, before: list[dict[str, Any]]) -> dict[str, Any]:
    """Two epochs of distill (2 Ray Train workers x 0.5 CPU, DeepSpeed on CPU, global batch 256) from
    the store just labelled: seconds from the driver's call (Ray Train's start-up included), and
    the second epoch's own seconds (the steady cost per row)."""
    from ensemblekd.stages.distill import distill

    cfg = cfg.model_copy(deep=True)
    cfg.trainer.epochs, cfg.trainer.batch_size = 2, 256
    with WorkerRss() as workers:
        result = distill(cfg, None, progress=False)
    seconds, epoch = result.seconds, result.metrics["epoch_seconds"]
    marginal = (seconds - before[-1]["seconds"]) / (rows - before[-1]["rows"]) * 1e6 if before else None
    row = {"bench": "distill", "rows": rows, "shards": rows // SHARD_ROWS, "teachers": 2, "seconds": seconds,
           "s_per_million_rows": seconds / rows * 1e6, "marginal_s_per_million_rows": marginal,
           "epoch_s": epoch, "epoch_s_per_million_rows": epoch / rows * 1e6, "driver_peak_rss_mb": peak_rss_mb(),
           "worker_peak_rss_mb": workers.peak_mb}
    print(json.dumps(row), flush=True)
    return row


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- manifest: shards and teachers grow ------------------------------------------------------------
def entry(split: str, teacher: str, index: int) -> dict[str, Any]:
    """A label shard's entry as a label actor returns it (classification, 10,000 rows)."""
    digest = hashlib.sha256(f"{split}/{teacher}/{index}".encode()).hexdigest()
    return {"rows": SHARD_ROWS, "bytes": 201_234, "sha256": digest, "num_classes": 10, "dtype": "float16",
            "written_by": {"node_id": digest[:56], "host": "ip-10-0-12-34", "pid": 41_234}}


class StoreSink:
    """The real Store: the manifest written whole at each save (before), or the commit log (now)."""

    def __init__(self, uri: str, shards: int, names: list[str], whole: bool):
        from ensemblekd.store import Store

        self.uri, self.whole_each_save, self.written = uri, whole, 0
        self.store = store = Store.open(uri, create=True)
        store.set_inputs("train", [{"uri": f"s3://bucket/data/train/part-{i:05d}.parquet", "rows": SHARD_ROWS,
                                    "bytes": 412_345, "offset": i * SHARD_ROWS, "footer": f"{i:016x}"}
                                   for i in range(shards)])
        for name in names:
            store.set_teacher(name, f"fp-{name}", {"model": "ensemblekd.models:mlp"})
        store.manifest["num_classes"] = 10

    def commit(self, split: str, teacher: str, index: int, e: dict[str, Any]) -> None:
        self.store.commit(split, teacher, index, e)

    def save(self, whole: bool) -> None:
        whole = whole or self.whole_each_save
        seq = self.store.log_seq
        self.store.save(whole=whole)
        path = os.path.join(self.uri, "manifest.json") if whole else self.store._log_uri(self.store.log_seq)
        self.written += os.path.getsize(path) if whole or self.store.log_seq != seq else 0

    def read(self) -> int:
        from ensemblekd.store import Store

        shards = Store.open(self.uri).manifest["shards"]
        return sum(len(entries) for per in shards.values() for entries in per.values())


class DeltaSink:
    """A Delta Lake table (deltalake) of the entries: each save appends the new ones as one commit."""

    def __init__(self, uri: str, shards: int, names: list[str], whole: bool):
        self.uri, self.pending, self.written = uri, [], 0

    def commit(self, split: str, teacher: str, index: int, e: dict[str, Any]) -> None:
        w = e["written_by"]
        self.pending.append({"split": split, "teacher": teacher, "index": index, "rows": e["rows"], "bytes": e["bytes"],
                             "sha256": e["sha256"], "node_id": w["node_id"], "host": w["host"], "pid": w["pid"]})

    def save(self, whole: bool) -> None:
        import pyarrow as pa
        from deltalake import write_deltalake

        if self.pending:
            write_deltalake(self.uri, pa.Table.from_pylist(self.pending), mode="append")
            self.pending = []
        self.written = sum(f.stat().st_size for f in Path(self.uri).rglob("*") if f.is_file())

    def read(self) -> int:
        from deltalake import DeltaTable

        if not os.path.exists(self.uri):
            return 0
        return DeltaTable(self.uri).to_pyarrow_table().num_rows


def bench_manifest(work: Path, shards: int, teachers: int, entry_seconds: float, design: str) -> dict[str, Any]:
    """The label loop's bookkeeping, on a virtual clock: each commit advances it by entry_seconds
    (the label cost per shard and teacher), each save by what the save really took (the driver's
    loop is blocked while it saves). Then what a reader pays to open the store mid-run (before the
    final whole save)."""
    uri = str(work / f"manifest-{shards}-{teachers}-{design.replace(' ', '_')}")
    gc.collect()
    rss_before = rss_mb()
    names = [f"teacher_{t}" for t in range(teachers)]
    sink = (DeltaSink if design == "delta lake" else StoreSink)(uri, shards, names, design == "whole each save")
    saving, saves, clock, last_save, peak = 0.0, 0, 0.0, 0.0, rss_mb()

    def timed_save(whole: bool) -> None:
        nonlocal saving, saves, clock
        t0 = time.perf_counter()
        sink.save(whole)
        took = time.perf_counter() - t0
        saving, saves, clock = saving + took, saves + 1, clock + took

    timed_save(True)  # the plan, as label saves it once the teachers agree
    for i in range(shards):
        for name in names:
            sink.commit("train", name, i, entry("train", name, i))
            clock += entry_seconds
            if clock - last_save > SAVE_EVERY_S:
                timed_save(False)
                last_save = clock
                peak = max(peak, rss_mb())
    t0 = time.perf_counter()
    seen = sink.read()  # all but the commits since the last save
    read_s = time.perf_counter() - t0
    before = saving
    timed_save(True)  # the end of the run: whole
    final_save_s = saving - before
    label_seconds = shards * teachers * entry_seconds
    row = {"bench": "manifest", "design": design, "shards": shards, "teachers": teachers, "entries": shards * teachers,
           "saves": saves, "manifest_s": saving, "label_s": label_seconds, "share": saving / (label_seconds + saving),
           "manifest_mb": sink.written / 2**20, "reader_open_s": read_s, "reader_saw": seen, "final_save_s": final_save_s, "driver_rss_growth_mb": peak - rss_before}
    shutil.rmtree(uri)
    print(json.dumps(row), flush=True)
    return row


def markdown(res: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    from ensemblekd.testing import markdown_table

    m = res["machine"]
    lines = [f"# bench_scale ({m['date']}, {m['cpu']}, {m['cores']} cores)", ""]

    def marginal(r: dict[str, Any]) -> str:
        return "" if r["marginal_s_per_million_rows"] is None else f"{r['marginal_s_per_million_rows']:.2f}"

    def rss(r: dict[str, Any]) -> list[str]:
        return [f"{r['driver_peak_rss_mb']:.0f}", f"{r['worker_peak_rss_mb']:.0f}"]

    rss_header = ["driver peak RSS MB", "worker peak RSS MB"]
    label = [r for r in rows if r["bench"] == "label"]
    if label:
        lines += ["## label: rows grow (2 teachers, 10,000-row shards, local Ray, 2 x 0.5 CPU)", "",
                  markdown_table(["rows", "shards", "seconds", "s per million rows", "marginal s per million rows",
                                  "s per shard x teacher", *rss_header],
                                 [[f"{r['rows']:,}", f"{r['shards']:,}", f"{r['seconds']:.1f}",
                                   f"{r['s_per_million_rows']:.1f}", marginal(r), f"{r['s_per_shard_teacher']:.3f}",
                                   *rss(r)] for r in label], left=0), ""]
    distilled = [r for r in rows if r["bench"] == "distill"]
    if distilled:
        lines += ["## distill: rows grow (two epochs, 2 Ray Train workers x 0.5 CPU, DeepSpeed on CPU, batch 256)", "",
                  markdown_table(["rows", "shards", "seconds", "s per million rows", "marginal s per million rows",
                                  "epoch 2 s", "epoch 2 s per million rows", *rss_header],
                                 [[f"{r['rows']:,}", f"{r['shards']:,}", f"{r['seconds']:.1f}",
                                   f"{r['s_per_million_rows']:.1f}", marginal(r), f"{r['epoch_s']:.1f}",
                                   f"{r['epoch_s_per_million_rows']:.1f}", *rss(r)] for r in distilled], left=0), ""]
    for bench, title in (("teachers", "label: teachers grow"), ("shards", "label: shards grow")):
        pts = [r for r in rows if r["bench"] == bench]
        if pts:
            lines += [f"## {title} ({pts[0]['rows']:,} rows, default placement, local Ray, 2 CPUs)", "",
                      markdown_table(["teachers", "shards", "label actors", "seconds", "s per million rows",
                                      "s per million rows x teachers", "s per shard x teacher", *rss_header],
                                     [[r["teachers"], f"{r['shards']:,}",
                                       ", ".join(f"{a['replicas']} x {len(a['teachers'])}" for a in r["actors"]),
                                       f"{r['seconds']:.1f}", f"{r['s_per_million_rows']:.1f}",
                                       f"{r['s_per_million_teacher_rows']:.1f}", f"{r['s_per_shard_teacher']:.3f}",
                                       *rss(r)] for r in pts], left=0), ""]
    manifest = [r for r in rows if r["bench"] == "manifest"]
    if manifest:
        lines += [f"## manifest: shards and teachers grow (label cost {res['entry_seconds']:.3f} s per shard x "
                  "teacher, saved about once a second, local disk)", "",
                  markdown_table(["design", "shards", "teachers", "entries", "saves", "manifest s", "share of label",
                                  "MB written", "reader open s", "final whole save s", "driver RSS growth MB"],
                                 [[r["design"], f"{r['shards']:,}", r["teachers"], f"{r['entries']:,}", f"{r['saves']:,}",
                                   f"{r['manifest_s']:.2f}", f"{100 * r['share']:.2f}%", f"{r['manifest_mb']:.1f}",
                                   f"{r['reader_open_s']:.2f}", f"{r['final_save_s']:.2f}",
                                   f"{r['driver_rss_growth_mb']:.0f}"] for r in manifest])]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """scale.png, one panel per part that ran: label and distill seconds per million rows against
    rows; label per million rows x teachers as teachers or shards grow; manifest seconds against
    entries, per design."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(bench: str, x: str, y: str) -> list[tuple[list, list]]:
        pts = [r for r in rows if r["bench"] == bench]
        return [([r[x] for r in pts], [r[y] for r in pts])] if pts else []

    designs = dict.fromkeys(r["design"] for r in rows if r["bench"] == "manifest")
    panels = [  # (title, x label, y label, [(label, xs, ys)])
        ("label and distill: cost per row", "rows", "s per million rows (start-up included)",
         [(b, *xy) for b in ("label", "distill") for xy in series(b, "rows", "s_per_million_rows")]),
        ("label: teachers and shards", "teachers, or shards", "s per million rows x teachers",
         [(f"{b} grow ({next(r['rows'] for r in rows if r['bench'] == b):,} rows)", *xy)
          for b in ("teachers", "shards") for xy in series(b, b, "s_per_million_teacher_rows")]),
        ("manifest work", "shards x teachers (8 teachers)", "manifest s in the label stage",
         [(d, *zip(*sorted((r["entries"], r["manifest_s"]) for r in rows if r.get("design") == d and r["teachers"] == 8)))
          for d in designs if any(r.get("design") == d and r["teachers"] == 8 for r in rows)]),
    ]
    panels = [p for p in panels if p[3]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 4), squeeze=False)
    for ax, (title, xlabel, ylabel, lines) in zip(axes[0], panels):
        for label, xs, ys in lines:
            ax.loglog(xs, ys, "o-", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tools/results", help="where scale.md and scale.json go (default tools/results)")
    p.add_argument("--quick", action="store_true", help="smoke test: 10^4 rows, up to 100 shards")
    p.add_argument("--max-rows", type=int, default=1_000_000, help="largest label run (default 10^6)")
    p.add_argument("--only", default="label,distill,teachers,shards,manifest", help="comma-separated subset of "
                   "label, distill (runs with label), teachers, shards, manifest")
    p.add_argument("--max-shards", type=int, default=10_000, help="shards: the most shards of 10^5 rows (default 10,000)")
    p.add_argument("--distill-max-rows", type=int, default=1_000_000, help="largest distill run (default 10^6)")
    p.add_argument("--entry-seconds", type=float, default=None,
                   help="manifest: label seconds per shard x teacher (default: measured by label)")
    p.add_argument("--delta", action="store_true", help="manifest: also a Delta Lake table (needs `pip install deltalake`)")
    p.add_argument("--work", default=None, help="directory for data and stores (default: a temporary one, removed)")
    args = p.parse_args(argv)
    import pyarrow as pa
    import ray

    from ensemblekd.testing import machine, write_results

    only = args.only.split(",")
    work = Path(args.work or tempfile.mkdtemp(prefix="ekd-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    res: dict[str, Any] = {"machine": machine(ray=ray.__version__, pyarrow=pa.__version__)}
    try:
        if "label" in only or "distill" in only:
            sizes = [10_000] if args.quick else [n for n in (10_000, 100_000, 1_000_000, 10_000_000) if n <= args.max_rows]
            rows += bench_label(work, sizes, args.distill_max_rows if "distill" in only else 0)
        if "teachers" in only:
            rows += bench_label_shape(work, 10_000 if args.quick else 1_000_000,
                                      [(n, SHARD_ROWS) for n in ((1, 2) if args.quick else (1, 2, 4, 8))], "teachers")
        if "shards" in only:
            shape_rows = 10_000 if args.quick else 100_000
            counts = [n for n in (10, 100, 1_000, 10_000) if n <= (100 if args.quick else args.max_shards)]
            rows += bench_label_shape(work, shape_rows, [(2, shape_rows // n) for n in counts], "shards")
        measured = [r["s_per_shard_teacher"] for r in rows if r["bench"] == "label"]
        res["entry_seconds"] = args.entry_seconds or (measured[-1] if measured else 0.05)
        if "manifest" in only:
            designs = ["whole each save", "commit log"] + (["delta lake"] if args.delta else [])
            for module in ["ensemblekd.store"] + (["deltalake"] if args.delta else []):
                importlib.import_module(module)  # before any RSS is measured
            grid = [(10, 1), (100, 8)] if args.quick else [(10, 8), (100, 8), (1_000, 8), (10_000, 1), (10_000, 2),
                                                           (10_000, 8)]
            for shards, teachers in grid:
                for design in designs:
                    if design == "whole each save" and shards * teachers > WHOLE_MAX_ENTRIES:
                        continue  # hours: each of thousands of saves rewrites tens of MB (see final whole save)
                    rows.append(bench_manifest(work, shards, teachers, res["entry_seconds"], design))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, "scale", res, rows, markdown(res, rows))
    plot(rows, out / "scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
