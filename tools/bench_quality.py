#!/usr/bin/env python3
"""What each weighting and strategy buys: student accuracy against the student trained alone.

For each data set and regime, three teachers are fitted once (full labels) and labelled once into
a store; then, for each seed, the student is trained alone (alpha = 1: hard labels only) and
distilled with every parallel weighting, sequential and assistant, all through the real pipeline
(Ray Train + DeepSpeed). Regimes:

  full  the student sees every train label;
  low   the student sees labels on 10% of the train rows (stratified, seeded) and the teachers'
        soft targets on all of them (an unlabelled transfer set; Hinton et al. 2015, section 4).

Reports mean ± std test accuracy over seeds and gap closed = (KD - alone) / (ensemble - alone),
writes OUT/quality.md and OUT/quality.png (accuracy against student size), and logs every run to
one MLflow experiment in OUT/mlflow.db.

    python tools/bench_quality.py                 # the full benchmark (about 30 min on 2 cores)
    python tools/bench_quality.py --quick         # smoke test: digits, 1 seed, one variant per regime, 3 epochs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import ensemblekd as ekd
from ensemblekd import tracking
from ensemblekd.config import Config, RayConfig
from ensemblekd.data.builtin import prepare
from ensemblekd.io.ray_session import ensure_ray, ray_session
from ensemblekd.stages.chain import distill_chain
from ensemblekd.stages.evaluate import evaluate

DATASETS = {"digits": (64, 10), "breast_cancer": (30, 2), "wine": (13, 3)}

# name -> distill section overrides (alpha = 1 is the student trained on hard labels alone)
VARIANTS = {
    "alone": {"alpha": 1.0},
    "uniform": {"weighting": "uniform"},
    "uniform (logit mix)": {"weighting": "uniform", "mix_space": "logit"},
    "accuracy (γ=4)": {"weighting": "accuracy", "gamma": 4.0},
    "entropy": {"weighting": "entropy"},
    "ca_mkd": {"weighting": "ca_mkd"},
    "sequential": {"strategy": "sequential", "order": "ascending_accuracy"},
    "assistant": {"strategy": "assistant", "assistants": "TA"},
}
# --quick, a smoke test in CI: the baseline on full labels and a per-sample rule on scarce ones (2 distill runs)
QUICK_VARIANTS = {"full": ["alone"], "low": ["ca_mkd"]}


def teachers(dataset: str, in_features: int, num_classes: int, out: Path) -> list[dict]:
    io = {"in_features": in_features, "num_classes": num_classes}
    third = ({"model": "ensemblekd.models:cnn", "kwargs": {**io, "channels": [16, 32], "hidden": 64}}
             if dataset == "digits" else {"model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": [512, 128]}})
    specs = [("wide_mlp", {"model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": [1024], "dropout": 0.2}}),
             ("deep_mlp", {"model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": [256, 256, 256], "dropout": 0.1}}),
             ("third", third)]
    return [{"name": name, **spec, "checkpoint": str(out / "teachers" / f"{name}.pt"),
             "fit": {"epochs": 40, "lr": 0.001, "weight_decay": 1e-4, "seed": i}, "num_cpus": 0.5}
            for i, (name, spec) in enumerate(specs)]


def mask_labels(src: Path, dst: Path, keep: float, seed: int) -> None:
    """A copy of a prepared data set whose train split keeps `keep` of its labels (stratified)."""
    for split in ("train", "val", "test"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        files = sorted((src / split).glob("*.parquet"))
        if split != "train":
            for f in files:
                (dst / split / f.name).write_bytes(f.read_bytes())
            continue
        tables = [pq.read_table(f) for f in files]
        y = np.concatenate([t["y"].to_numpy() for t in tables])
        rng = np.random.default_rng(seed)
        kept = np.zeros(len(y), bool)
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            kept[rng.choice(idx, max(1, round(keep * len(idx))), replace=False)] = True
        start = 0
        for f, t in zip(files, tables):
            mask = kept[start:start + t.num_rows]
            start += t.num_rows
            labels = pa.array([int(v) if m else None for v, m in zip(t["y"].to_numpy(), mask)], pa.int64())
            pq.write_table(t.set_column(t.column_names.index("y"), "y", labels), dst / split / f.name)


def base_config(dataset: str, regime: str, data: Path, out: Path, epochs: int, hidden: int) -> dict:
    """The teachers are fitted on full labels (the full regime's config); the low regime reuses them."""
    in_features, num_classes = DATASETS[dataset]
    fitted = teachers(dataset, in_features, num_classes, out / dataset)
    if regime != "full":
        fitted = [{k: v for k, v in t.items() if k != "fit"} for t in fitted]
    return {
        "data": {"train": str(data / "train"), "val": str(data / "val"), "test": str(data / "test")},
        "teachers": fitted,
        "store": {"uri": str(out / dataset / regime / "store")},
        "student": {"model": "ensemblekd.models:mlp",
                    "kwargs": {"in_features": in_features, "num_classes": num_classes, "hidden": [hidden]}},
        "distill": {"temperature": 4.0, "alpha": 0.5},
        "trainer": {"num_workers": 2, "epochs": epochs, "batch_size": 64, "lr": 0.005,
                    "output_dir": str(out / dataset / regime / "runs")},
        "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "ensemblekd-bench-quality"},
        "ray": {"num_cpus": 2},
    }


def variant_config(base: dict, variant: str, seed: int, hidden: int) -> Config:
    raw = json.loads(json.dumps(base))
    distill = dict(VARIANTS[variant])
    if distill.get("assistants") == "TA":  # an assistant about 2.5x the student (capacity-gap rule of thumb)
        kw = raw["student"]["kwargs"]
        distill["assistants"] = [{"name": f"ta_{hidden}_{seed}", "model": "ensemblekd.models:mlp",
                                  "kwargs": {**kw, "hidden": [int(2.5 * hidden)]}}]
    raw["distill"].update(distill)
    raw["trainer"]["seed"] = seed
    raw["trainer"]["output_dir"] = f"{raw['trainer']['output_dir']}/{variant.split()[0]}-h{hidden}-s{seed}"
    raw["tracking"]["run_name"] = f"{variant} h{hidden} seed{seed}"
    return Config.model_validate(raw)


def run_variant(cfg: Config, tags: dict) -> dict:
    with tracking.mlflow_run(cfg, "bench") as info:
        import mlflow

        mlflow.set_tags({f"bench.{k}": v for k, v in tags.items()})
        trained = distill_chain(cfg, info, progress=False)
        report = evaluate(cfg, trained["student"])
        tracking.log_metrics({f"test_accuracy.{r['model']}": r["accuracy"] for r in report["rows"]})
    return {r["model"]: r for r in report["rows"]}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> tuple[str, list[dict]]:
    """The markdown table: one row per (data set, regime, variant) at the main student size."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["regime"], r["hidden"], r["variant"]), []).append(r)
    rows = []
    for (dataset, regime, hidden, variant), rs in groups.items():
        alone = [x["student"] for x in groups.get((dataset, regime, hidden, "alone"), [])]
        ens = statistics.fmean(x["ensemble"] for x in rs)
        acc_mean, acc_std = mean_std([x["student"] for x in rs])
        gap = None
        if alone and variant != "alone":
            alone_mean = statistics.fmean(alone)
            gap = (acc_mean - alone_mean) / (ens - alone_mean) if ens != alone_mean else None
        rows.append({"dataset": dataset, "regime": regime, "hidden": hidden, "variant": variant, "mean": acc_mean,
                     "std": acc_std, "ensemble": ens, "gap_closed": gap, "n": len(rs),
                     "teachers": {k: statistics.fmean(x["teachers"][k] for x in rs) for k in rs[0]["teachers"]},
                     "params": rs[0]["params"]})
    lines = ["| data set | regime | student | variant | test acc (mean ± std) | gap closed | ensemble | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = "—" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        lines.append(f"| {r['dataset']} | {r['regime']} | mlp[{r['hidden']}] ({r['params']:,} p) | {r['variant']} | "
                     f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {gap} | {100 * r['ensemble']:.2f} | {r['n']} |")
    teacher_lines = ["", "| data set | teacher | test acc |", "|---|---|---|"]
    seen = set()
    for r in rows:
        for name, acc in r["teachers"].items():
            if (r["dataset"], name) not in seen:
                seen.add((r["dataset"], name))
                teacher_lines.append(f"| {r['dataset']} | {name} | {100 * acc:.2f} |")
    return "\n".join(lines + teacher_lines), rows


def chart(rows: list[dict], results: list[dict], path: Path) -> None:
    """Accuracy against student size (parameters), per data set and regime: alone vs. best KD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["regime"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (dataset, regime) in zip(axes[0], panels):
        mine = [r for r in rows if r["dataset"] == dataset and r["regime"] == regime]
        for variant, style in (("alone", "o--"), ("uniform", "s-"), ("ca_mkd", "^-")):
            pts = sorted((r["params"], r["mean"], r["std"]) for r in mine if r["variant"] == variant)
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, [100 * y for y in ys], yerr=[100 * e for e in es], fmt=style, label=f"student: {variant}",
                            capsize=3)
        ens = statistics.fmean(r["ensemble"] for r in mine)
        sizes = [x["teacher_params"] for x in results if x["dataset"] == dataset][0]
        ax.scatter([sum(sizes.values())], [100 * ens], marker="*", s=160, color="k", label="ensemble", zorder=3)
        for name, acc in mine[0]["teachers"].items():
            ax.scatter([sizes[name]], [100 * acc], marker="x", color="gray")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset}, {regime} labels")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_quality", help="output directory (default runs/bench_quality)")
    p.add_argument("--quick", action="store_true", help="smoke test: digits, 1 seed, one variant per regime, 3 epochs")
    p.add_argument("--datasets", default="digits,wine")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=32, help="the student's hidden width")
    p.add_argument("--sizes", default="8,128", help="extra student widths for the digits size chart (uniform, alone)")
    p.add_argument("--low-label-fraction", type=float, default=0.1)
    p.add_argument("--summarise-only", action="store_true", help="rewrite the table and chart from OUT/quality.json")
    args = p.parse_args(argv)
    if args.summarise_only:
        out = Path(args.out).resolve()
        return write_report(json.loads((out / "quality.json").read_text()), out,
                            "Re-summarised from quality.json by `python tools/bench_quality.py --summarise-only`.\n\n")
    datasets = ["digits"] if args.quick else args.datasets.split(",")
    seeds = range(1 if args.quick else args.seeds)
    epochs = 3 if args.quick else args.epochs
    variants = QUICK_VARIANTS if args.quick else {"full": list(VARIANTS), "low": list(VARIANTS)}
    sizes = [] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = []
    with ray_session():
        ensure_ray(RayConfig(num_cpus=2))
        for dataset in datasets:
            full = out / dataset / "data" / "full"
            if not (full / "test").exists():
                prepare(dataset, str(full), shard_rows=128)
            low = out / dataset / "data" / "low"
            if not (low / "test").exists():
                mask_labels(full, low, args.low_label_fraction, seed=0)
            for regime, data in (("full", full), ("low", low)):
                base = base_config(dataset, regime, data, out, epochs, args.hidden)
                ekd.label(Config.model_validate(base), progress=False)  # fits once, labels once per regime
                extra = sizes if dataset == "digits" else []  # the size chart: digits only
                plan = [(v, args.hidden) for v in variants[regime]] + [(v, h) for h in extra for v in ("alone", "uniform")]
                for seed in seeds:
                    for variant, hidden in plan:
                        cfg = variant_config(base_config(dataset, regime, data, out, epochs, hidden), variant, seed, hidden)
                        t0 = time.perf_counter()
                        rows = run_variant(cfg, {"dataset": dataset, "regime": regime, "variant": variant, "seed": seed})
                        teacher_rows = [r for r in rows.values() if r["role"] == "teacher"]
                        results.append({"dataset": dataset, "regime": regime, "variant": variant, "seed": seed,
                                        "hidden": hidden, "student": rows["student"]["accuracy"],
                                        "params": rows["student"]["params"], "ensemble": rows["ensemble"]["accuracy"],
                                        "teachers": {r["model"]: r["accuracy"] for r in teacher_rows},
                                        "teacher_params": {r["model"]: r["params"] for r in teacher_rows}})
                        print(f"[bench] {dataset} {regime} {variant:22s} h{hidden:<4d} seed {seed}: "
                              f"{100 * results[-1]['student']:.2f}% ({time.perf_counter() - t0:.0f} s)", flush=True)
    header = (f"Generated by `python tools/bench_quality.py{' --quick' if args.quick else ''}` in "
              f"{(time.perf_counter() - start) / 60:.1f} min on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; "
              f"{epochs} epochs, T = 4, alpha = 0.5, low-label regime: {100 * args.low_label_fraction:.0f}% of train "
              "labels. Gap closed = (KD - alone) / (ensemble - alone).\n\n")
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    return write_report(results, out, header)


def write_report(results: list[dict], out: Path, header: str) -> int:
    table, rows = summarise(results)
    (out / "quality.md").write_text(header + table + "\n")
    chart(rows, results, out / "quality.png")
    print(header + table)
    print(f"\nwrote {out / 'quality.md'}, {out / 'quality.png'}, {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
