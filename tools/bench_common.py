"""What the LM benchmarks under tools/ share: the machine, their versions and the measured code.

Internals measured directly:
  ensemblekd.topk: hashed, not run: the top-k code whose figures the LM tables give
  ensemblekd.tasks.token.codec: hashed, not run: the shard codec whose figures the LM tables give
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def lm_machine() -> dict[str, Any]:
    """testing.machine() with the LM benchmarks' versions and a hash of the measured code: the top-k
    targets and their reconstruction (ensemblekd/topk.py) and the shard codec (ensemblekd/tasks/token/codec.py)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import torch
    import transformers

    import ensemblekd.tasks.token.codec
    import ensemblekd.topk
    from ensemblekd.testing import machine

    code = b"".join(Path(m.__file__).read_bytes() for m in (ensemblekd.topk, ensemblekd.tasks.token.codec))
    return {**machine(torch=torch.__version__, transformers=transformers.__version__, pyarrow=pa.__version__,
                      numpy=np.__version__), "topk_codec_sha256": hashlib.sha256(code).hexdigest()[:16]}


# -- distillation runs of one config at a fixed token budget (bench_prune, bench_crosstok) --------

def budget_arguments(doc: str, work: str):
    """The arguments of a benchmark over seeds at a token budget of --train-shards (add its own to them)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train-shards", type=int, default=1)
    ap.add_argument("--work", default=work, help="data, teachers, store and runs (reused)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return ap


def open_budget(args, config: str, experiment: str) -> tuple[dict, dict]:
    """(the config as written, the config on the token budget), working in args.work, where the
    config's data and teachers' files are prepared once."""
    import yaml

    import ensemblekd as ekd
    from ensemblekd.stages.prepare import prepare

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / config).read_text())
    prepare(ekd.load_config(base))
    return base, subset_config(base, work, args.train_shards, experiment)


def subset_config(base: dict, work: Path, train_shards: int, experiment: str) -> dict:
    """The config on the first train shards of its train split (copied once under work/data), with a
    store, fitted teachers and runs of its own under runs/bench; the evaluate baseline off (each
    benchmark trains its own)."""
    import copy
    import glob
    import shutil

    cfg = copy.deepcopy(base)
    subset = work / "data" / "train_subset"
    if not subset.exists():
        tmp = work / "data" / "train_subset.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for shard in sorted(glob.glob(str(work / base["data"]["train"] / "*.parquet")))[:train_shards]:
            shutil.copy(shard, tmp)
        tmp.rename(subset)
    cfg["data"].update({"train": str(subset), "prepare": None})
    own_runs = base["trainer"]["output_dir"].rstrip("/") + "/"
    for t in cfg["teachers"]:
        if t.get("checkpoint"):
            t["checkpoint"] = t["checkpoint"].replace(own_runs, "runs/bench/")
    cfg["store"]["uri"] = "runs/bench/store"
    cfg["trainer"].update({"output_dir": "runs/bench/run"})
    cfg["evaluate"]["baseline"] = False
    cfg["tracking"] = {"experiment": experiment, "log_model": False}
    return cfg


def variant(cfg: dict, name: str, seed: int, **changes) -> dict:
    """cfg with whole sections or some of their keys changed, the seed set and a run directory of its own."""
    import copy

    out = copy.deepcopy(cfg)
    for section, values in changes.items():
        out[section] = values if values is None or not isinstance(out.get(section), dict) else {**out[section], **values}
    out["trainer"]["seed"] = seed
    out["trainer"]["output_dir"] = f"runs/bench/{name}-seed{seed}"
    return out


def test_quality(eval_cfg, student, models: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Task.quality over the test split: perplexity, top-1 and (splits written from text) bits per
    byte of the student, the ensemble and the teachers among `models`."""
    from ensemblekd.mixing import build_strategy
    from ensemblekd.store import Store
    from ensemblekd.tasks import get_task

    store = Store.open(eval_cfg.store.uri)
    names = [t.name for t in eval_cfg.teachers]
    strategy = build_strategy(eval_cfg.distill, names, store.val_accuracy(names), eval_cfg.trainer.epochs, ensemble=True)
    found, _ = get_task(eval_cfg.task).quality(eval_cfg, store, names, [], student, strategy)
    return {m: {k: found[m][k] for k in ("perplexity", "accuracy", "bits_per_byte") if found[m].get(k) is not None}
            for m in models if m in found}


def kept_run(runs: list[dict], name: str, seed: int, run_cfg: dict, measure) -> dict:
    """Distil run_cfg (ensemblekd.api, as a user calls it) and append its row, measure(loaded config,
    student) plus variant, seed, seconds and parameters, to runs. The row is kept in the run's
    directory with the config, in place of its checkpoints and student (4 GB for a 97M-parameter
    student), and reused by a later call with the same config: an interrupted benchmark goes on."""
    import json
    import shutil
    import time

    import ensemblekd as ekd
    from ensemblekd.models import build_student, count_parameters, load_student

    kept = Path(run_cfg["trainer"]["output_dir"]) / "bench_row.json"
    if kept.exists() and json.loads(kept.read_text())["config"] == run_cfg:
        row = json.loads(kept.read_text())["row"]
        runs.append(row)
        print("reused", row, flush=True)
        return row
    t0 = time.perf_counter()
    result = ekd.distill(run_cfg, progress=False)
    loaded = ekd.load_config(run_cfg)
    row = {"variant": name, "seed": seed, **measure(load_student(loaded.student, result.student)),
           "seconds": time.perf_counter() - t0, "params": count_parameters(build_student(loaded.student))}
    runs.append(row)
    for item in kept.parent.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    kept.write_text(json.dumps({"config": run_cfg, "row": row}))
    print(row, flush=True)
    return row


def tokens_per_s(model, x) -> list[float]:
    """Three timed forwards on x (after one untimed), 1 thread, as tokens/s: report their median and spread."""
    from ensemblekd.stages.evaluate import measure_latency, one_thread

    with one_thread():
        return [x.numel() / (measure_latency(model, x, warmup=int(i == 0), repeats=1)[0] / 1000) for i in range(3)]
