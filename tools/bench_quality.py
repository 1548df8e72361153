#!/usr/bin/env python3
"""What each weighting, strategy, divergence and feature term buys: student accuracy against the
student trained alone.

For each data set and regime, three teachers are fitted once (full labels) and labelled once into
a store; then, for each seed, the student is trained alone (alpha = 1: hard labels only) and
distilled with each variant, all through the real pipeline (Ray Train + DeepSpeed). Regimes:

  full  the student sees every train label;
  low   the student sees labels on 10% of the train rows (stratified, seeded) and the teachers'
        soft targets on all of them (an unlabelled transfer set; Hinton et al. 2015, section 4).

Data sets: digits and wine (scikit-learn; three generalist teachers that agree, all >= 96.9%
accurate) and `specialists`, built here so that the teachers disagree: 12 classes in 3 groups of
4, features in 3 blocks of 6 (one per group: a data source that measures its own group's classes);
a row of group g has its class signal (a class mean at distance 3.5) in block g and noise of std
2 in the other blocks. Teacher g (spec_g, an mlp[64, 64] fitted here in plain torch) sees only its
own block (its first layer's weights on the other blocks are zero) and is fitted only on the rows
of its own group, with all 12 outputs: accurate on its group (86-98%), 27-34% overall, and
confidently wrong on the other groups' rows. There a uniform mix is often wrong, and a per-sample
rule that finds the right specialist (ca_mkd with labels; entropy without) has something to gain.
For this set the benchmark also reports, per rule, the mean weight each rule gave the right
specialist (the teacher of the row's group) on the train split, from the stored train logits.

Variants (--variants takes names or these groups):

  alone        alpha = 1: the student on the labels alone
  rules        uniform, uniform (logit mix), accuracy (gamma = 4), entropy, ca_mkd (forward KL)
  staged       sequential (ascending accuracy), assistant (TAKD, an mlp 2.5x the student)
  divergences  distill.loss reverse_kl, jsd, tvd, skew_kl, skew_reverse_kl (uniform weighting;
               forward_kl, the default, is the `uniform` rule variant)
  features     hint (FitNets, hint_weight 1), rkd distance (25), rkd angle (50) (Park et al.'s
               weights), uniform weighting, with every teacher's penultimate feature (its last
               ReLU) stored in a separate store (store_features) reduced to 32 dims by PCA
  born_again   strategy born_again, 2 generations

The full plan (python tools/bench_quality.py; PLAN), 30 epochs, 3 seeds, student mlp[32]: each
variant where it has something to show, so that the whole family fits in about an hour on 2 cores
(a student run is ~32 s here: Ray Train's start, 30 epochs each checkpointed and reported, the
evaluation):

  specialists  full: alone and the rules (uniform, accuracy, entropy, ca_mkd); low: alone, uniform,
               entropy, ca_mkd (the teachers disagree: the rules can differ only here)
  digits       full: alone, uniform, the five other divergences (never worse than alone?)
               low: alone, uniform, the divergences, the feature and relation terms, TAKD and
               born-again (the regime where the soft targets matter)
  wine         full: alone, uniform

that is 3 x (5 + 4 + 7 + 12 + 2) = 90 student runs (96 distills: a TA level and a second
generation add one each); 59 min on 2026-11-29. The run prints its estimate before it starts; --dry-run prints only that. Any other
combination runs with --datasets/--regimes/--variants (e.g. --variants all), and --sizes adds the
student-size chart (digits, full labels: alone and uniform at other widths). Results are saved
after every run to OUT/quality.partial.json.

Reports mean ± std test accuracy over seeds and gap closed = (KD - alone) / (ensemble - alone)
(each variant's own ensemble: its rule's mix at T = 1, without labels), per data set and regime
the best variant and the goals checked, writes OUT/quality.md, OUT/quality.json and OUT/quality.png
(accuracy against student size, and every variant's mean ± std per data set and regime), and
logs every run (ekd.distill's and ekd.evaluate's, each named after its data set, regime, variant,
width and seed) to one MLflow experiment in OUT/mlflow.db.

    python tools/bench_quality.py                 # the full benchmark (59 min on 2 cores)
    python tools/bench_quality.py --quick         # smoke test: specialists low ca_mkd; 1 seed, 3 epochs
    python tools/bench_quality.py --datasets specialists --variants rules,alone --seeds 2
    python tools/bench_quality.py --summarise-only

Internals measured directly:
  ensemblekd.fitting: the specialists are fitted by the teachers' seeded loop (fit_module); the API fits whole configs
  ensemblekd.mixing: each rule's per-row weights on the stored logits (build_strategy); the API mixes only in training
  ensemblekd.io.ray_session: one local Ray for the whole run; each ekd.* call alone starts and stops one
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATASETS = {"digits": (64, 10), "breast_cancer": (30, 2), "wine": (13, 3), "specialists": (18, 12)}

# -- the specialists data set -------------------------------------------------------------------
SPECIALISTS = {"groups": 3, "per_group": 4, "block": 6, "sep": 3.5, "other_noise": 2.0, "rows": 3600}
SPECIALIST_FIT = {"hidden": [64, 64], "epochs": 60, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64}


def specialist_data(seed: int = 0, rows: int = 3600, groups: int = 3, per_group: int = 4, block: int = 6,
                    sep: float = 3.5, other_noise: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [rows, groups * block], y int64 [rows]): class c is in group c // per_group; a row
    of group g has N(mean_c, 1) in block g (mean_c: a random direction at distance `sep`) and
    N(0, other_noise^2) in the other blocks. Deterministic by seed."""
    rng = np.random.default_rng([seed, 7])
    classes = groups * per_group
    means = rng.normal(size=(classes, block))
    means *= sep / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, classes, rows)
    x = rng.normal(0.0, other_noise, (rows, groups * block))
    for c in range(classes):
        g, idx = c // per_group, np.flatnonzero(y == c)
        x[idx, g * block:(g + 1) * block] = means[c] + rng.normal(size=(len(idx), block))
    return x.astype(np.float32), y.astype(np.int64)


def prepare_specialists(out: Path, shard_rows: int = 128, seed: int = 0) -> None:
    """The specialists set as out/{train,val,test}/part-NNNNN.parquet (id, x list<float>, y), the
    layout of ensemblekd.data.builtin.prepare_sklearn: a stratified 60/20/20 split, features
    standardised with the train split's statistics."""
    from sklearn.model_selection import train_test_split

    x, y = specialist_data(seed, **SPECIALISTS)
    ids = np.arange(len(y), dtype=np.int64)
    idx_train, idx_rest = train_test_split(ids, train_size=0.6, stratify=y, random_state=seed)
    idx_val, idx_test = train_test_split(idx_rest, train_size=0.5, stratify=y[idx_rest], random_state=seed)
    mean, std = x[idx_train].mean(0), x[idx_train].std(0) + 1e-6
    x = ((x - mean) / std).astype(np.float32)
    for split, idx in (("train", idx_train), ("val", idx_val), ("test", idx_test)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, start in enumerate(range(0, len(idx), shard_rows)):
            part = np.sort(idx[start:start + shard_rows])
            table = pa.table({"id": pa.array(part),
                              "x": pa.FixedSizeListArray.from_arrays(pa.array(x[part].reshape(-1), pa.float32()),
                                                                      x.shape[1]),
                              "y": pa.array(y[part])})
            pq.write_table(table, out / split / f"part-{i:05d}.parquet")


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, x [n, F] float32, y [n] int64 with -100 where the label is missing) of a prepared split."""
    from ensemblekd import testing

    return testing.read_split(str(path), "x", "y", "id")


def fit_specialist(x: np.ndarray, y: np.ndarray, group: int, seed: int = 0, epochs: int | None = None):
    """Specialist `group`: ensemblekd.models:mlp with all C outputs, fitted (seeded, plain torch) on
    the rows of its group's classes only and seeing only its group's feature block."""
    import torch
    import torch.nn.functional as F

    from ensemblekd import testing
    from ensemblekd.fitting import fit_module

    s, f = SPECIALISTS, SPECIALIST_FIT
    torch.manual_seed(seed * 100 + group)
    model = testing.mlp(x.shape[1], s["groups"] * s["per_group"], f["hidden"])
    keep = torch.zeros(x.shape[1])
    keep[group * s["block"]:(group + 1) * s["block"]] = 1.0
    with torch.no_grad():
        model[0].weight.mul_(keep)
    hook = model[0].weight.register_hook(lambda grad: grad * keep)  # AdamW's decay keeps the zeros at zero
    rows = np.flatnonzero((y >= 0) & (y // s["per_group"] == group))
    xs, ys = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
    fit_module(model, len(rows), lambda i: F.cross_entropy(model(xs[i]), ys[i]), epochs or f["epochs"], f["lr"],
               f["batch_size"], seed=seed * 100 + group, weight_decay=f["weight_decay"])
    hook.remove()
    return model


def fit_specialists(data: Path, out: Path, seed: int = 0) -> list[Path]:
    """Fit (once) and save the three specialists' state dicts: out/spec_G.pt."""
    from ensemblekd import testing

    paths = [out / f"spec_{g}.pt" for g in range(SPECIALISTS["groups"])]
    if all(p.exists() for p in paths):
        return paths
    _, x, y = read_split(data / "train")
    for g, p in enumerate(paths):
        testing.save_state(fit_specialist(x, y, g, seed), str(p))
    return paths


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


# -- teachers, variants, configs ------------------------------------------------------------------
def feature_module(model: str, kwargs: dict) -> str:
    """The name of a model's last ReLU (its penultimate feature), as in model.named_modules()."""
    from torch import nn

    from ensemblekd import testing

    return [name for name, m in testing.build_module(model, kwargs).named_modules() if isinstance(m, nn.ReLU)][-1]


def teachers(dataset: str, in_features: int, num_classes: int, out: Path) -> list[dict]:
    io = {"in_features": in_features, "num_classes": num_classes}
    if dataset == "specialists":
        return [{"name": f"spec_{g}", "model": "ensemblekd.models:mlp",
                 "kwargs": {**io, "hidden": SPECIALIST_FIT["hidden"]},
                 "checkpoint": str(out / "teachers" / f"spec_{g}.pt"), "num_cpus": 0.5}
                for g in range(SPECIALISTS["groups"])]
    third = ({"model": "ensemblekd.models:cnn", "kwargs": {**io, "channels": [16, 32], "hidden": 64}}
             if dataset == "digits" else {"model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": [512, 128]}})
    specs = [("wide_mlp", {"model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": [1024], "dropout": 0.2}}),
             ("deep_mlp", {"model": "ensemblekd.models:mlp", "kwargs": {**io, "hidden": [256, 256, 256], "dropout": 0.1}}),
             ("third", third)]
    return [{"name": name, **spec, "checkpoint": str(out / "teachers" / f"{name}.pt"),
             "fit": {"epochs": 40, "lr": 0.001, "weight_decay": 1e-4, "seed": i}, "num_cpus": 0.5}
            for i, (name, spec) in enumerate(specs)]


# name -> (group, distill section overrides); alpha = 1 is the student trained on hard labels alone
VARIANTS: dict[str, tuple[str, dict]] = {
    "alone": ("alone", {"alpha": 1.0}),
    "uniform": ("rules", {"weighting": "uniform"}),
    "uniform (logit mix)": ("rules", {"weighting": "uniform", "mix_space": "logit"}),
    "accuracy (γ=4)": ("rules", {"weighting": "accuracy", "gamma": 4.0}),
    "entropy": ("rules", {"weighting": "entropy"}),
    "ca_mkd": ("rules", {"weighting": "ca_mkd"}),
    "sequential": ("staged", {"strategy": "sequential", "order": "ascending_accuracy"}),
    "assistant": ("staged", {"strategy": "assistant", "assistants": "TA"}),
    **{loss: ("divergences", {"loss": loss}) for loss in ("reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl")},
    "hint": ("features", {"hint_weight": 1.0}),
    "rkd distance": ("features", {"rkd_distance_weight": 25.0}),
    "rkd angle": ("features", {"rkd_angle_weight": 50.0}),
    "born_again": ("born_again", {"strategy": "born_again", "generations": 2}),
}
GROUPS = list(dict.fromkeys(group for group, _ in VARIANTS.values()))
RULES = [v for v, (group, _) in VARIANTS.items() if group == "rules"]
PER_SAMPLE_RULES = ("entropy", "ca_mkd")
COST = {"assistant": 2, "born_again": 2}  # student runs a variant costs (a TA level, 2 generations)
# the full plan: (data set, regime) -> the variant groups and names it runs at the main student size
PLAN = {("specialists", "full"): ["alone", "uniform", "accuracy (γ=4)", "entropy", "ca_mkd"],
        ("specialists", "low"): ["alone", "uniform", "entropy", "ca_mkd"],
        ("digits", "full"): ["alone", "uniform", "divergences"],
        ("digits", "low"): ["alone", "uniform", "divergences", "features", "assistant", "born_again"],
        ("wine", "full"): ["alone", "uniform"], ("breast_cancer", "full"): ["alone", "rules"]}
SIZE_CHART = {("digits", "full"): ("alone", "uniform")}  # the variants run at --sizes for the size chart
# --quick, a smoke test in CI: a per-sample rule on scarce labels, on the specialists (1 distill run: the data
# set, its fitted teachers, both regimes' stores, the label masking, the rules' weights and the report)
QUICK = {("specialists", "low"): ["ca_mkd"]}
# seconds a student run takes on 2 cores (Ray Train start, epochs, evaluate without latency):
# RUN_S + EPOCH_S[dataset] * epochs, about 15 s for digits at 30 epochs (a --quick run took 22 s at 3
# epochs with other work on the machine); and each data set's one-off fits and labels
RUN_S = 20.0
EPOCH_S = {"digits": 0.4, "specialists": 0.45, "wine": 0.25, "breast_cancer": 0.3}
SETUP_S = {"digits": 60.0, "specialists": 25.0, "wine": 20.0, "breast_cancer": 20.0}

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("γ", "gamma")).strip("_")


def select_variants(spec: str) -> list[str]:
    """Variant names from a comma list of names, their slugs (uniform_logit_mix) or groups; 'all'."""
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "all":
            chosen += list(VARIANTS)
        elif item in GROUPS:
            chosen += [v for v, (group, _) in VARIANTS.items() if group == item]
        else:
            match = [v for v in VARIANTS if item in (v, slug(v))]
            if not match:
                raise SystemExit(f"--variants: unknown '{item}'; choose from groups {GROUPS} or {list(map(slug, VARIANTS))}")
            chosen += match
    return list(dict.fromkeys(chosen))


def needs_features(variant: str) -> bool:
    return VARIANTS[variant][0] == "features"


def base_config(dataset: str, regime: str, data: Path, out: Path, epochs: int, hidden: int,
                features: bool = False) -> dict:
    """The teachers are fitted on full labels (the full regime's config); the low regime reuses them.
    features: every teacher stores its penultimate feature, in a store of its own (store_features)."""
    in_features, num_classes = DATASETS[dataset]
    fitted = teachers(dataset, in_features, num_classes, out / dataset)
    if regime != "full":
        fitted = [{k: v for k, v in t.items() if k != "fit"} for t in fitted]
    student = {"model": "ensemblekd.models:mlp",
               "kwargs": {"in_features": in_features, "num_classes": num_classes, "hidden": [hidden]}}
    store = {"uri": str(out / dataset / regime / "store")}
    if features:
        fitted = [{**t, "feature": feature_module(t["model"], t["kwargs"])} for t in fitted]
        student["feature"] = feature_module(student["model"], student["kwargs"])
        store = {"uri": str(out / dataset / regime / "store_features"), "feature_dim": 32}
    return {
        "data": {"train": str(data / "train"), "val": str(data / "val"), "test": str(data / "test")},
        "teachers": fitted,
        "store": store,
        "student": student,
        "distill": {"temperature": 4.0, "alpha": 0.5},
        "trainer": {"num_workers": 2, "epochs": epochs, "batch_size": 64, "lr": 0.005,
                    "output_dir": str(out / dataset / regime / "runs")},
        "evaluate": {"repeats": 0},  # no latency: quality only
        "tracking": {"uri": f"sqlite:///{out / 'mlflow.db'}", "experiment": "ensemblekd-bench-quality",
                     "log_model": False},  # runs compared by metrics: no served model each
        "ray": {"num_cpus": 2},
    }


def variant_config(base: dict, variant: str, seed: int, hidden: int, where: str) -> dict:
    """The variant's config; its MLflow runs are named `where variant hHIDDEN seedSEED`."""
    raw = json.loads(json.dumps(base))
    distill = dict(VARIANTS[variant][1])
    if distill.get("assistants") == "TA":  # an assistant about 2.5x the student (capacity-gap rule of thumb)
        kw = raw["student"]["kwargs"]
        ta = {"name": f"ta_{hidden}_{seed}", "model": "ensemblekd.models:mlp",
              "kwargs": {**kw, "hidden": [int(2.5 * hidden)]}}
        if raw["student"].get("feature"):
            ta["feature"] = feature_module(ta["model"], ta["kwargs"])
        distill["assistants"] = [ta]
    raw["distill"].update(distill)
    raw["trainer"]["seed"] = seed
    raw["trainer"]["output_dir"] = f"{raw['trainer']['output_dir']}/{slug(variant)}-h{hidden}-s{seed}"
    raw["tracking"]["run_name"] = f"{where} {variant} h{hidden} seed{seed}"
    return raw


def run_variant(cfg: dict) -> dict:
    """Distil the student (with its TA or generations) and evaluate it, an MLflow run each: the
    evaluation's rows (ekd.ModelRow) by model."""
    import ensemblekd as ekd

    trained = ekd.distill(cfg, progress=False)
    return {r.model: r for r in ekd.evaluate(cfg, student=trained.student).rows}


def right_specialist_weights(base: dict, regime: str, full: Path) -> list[dict]:
    """Per rule variant, on the train split of the specialists set: the mean weight the rule gave the
    right specialist (the teacher of the row's group), over all rows and over the labelled ones, and
    the accuracy of the mixed target (its argmax at T against the true label), from the stored logits."""
    import torch

    import ensemblekd as ekd
    from ensemblekd.mixing import build_strategy

    cfg = ekd.load_config(base, check=False)
    names = [t.name for t in cfg.teachers]
    store = ekd.open_store(cfg.store.uri)
    targets = [store.targets(n, "train") for n in names]
    ids = targets[0].ids
    z = torch.from_numpy(np.stack([t.logits for t in targets], axis=1).astype(np.float32))   # [N, K, C]
    true_ids, _, true_y = read_split(full / "train")
    _, _, seen_y = read_split(Path(cfg.data.train))
    order = {int(i): j for j, i in enumerate(true_ids)}
    pos = np.array([order[int(i)] for i in ids])
    y, labels = torch.from_numpy(true_y[pos]), torch.from_numpy(seen_y[pos])
    group = y // SPECIALISTS["per_group"]
    rows = []
    for variant in RULES:
        d = cfg.distill.model_copy(update=VARIANTS[variant][1])
        strategy = build_strategy(d, names, store.val_accuracy(names), cfg.trainer.epochs)
        p, w = strategy.targets(z, labels, d.temperature)
        right = w.gather(1, group.view(-1, 1)).squeeze(1)
        labelled = labels != -100
        rows.append({"regime": regime, "rule": variant, "right_weight": float(right.mean()),
                     "right_weight_labelled": float(right[labelled].mean()) if labelled.any() else None,
                     "target_accuracy": float((p.argmax(-1) == y).float().mean()), "rows": len(y)})
    return rows


# -- the report -------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(results: list[dict], dataset: str, regime: str, hidden: int, a: str, b: str) -> list[float]:
    """Per seed run by both: student accuracy of variant a minus variant b."""
    by = {v: {r["seed"]: r["student"] for r in results if (r["dataset"], r["regime"], r["hidden"], r["variant"])
              == (dataset, regime, hidden, v)} for v in (a, b)}
    return [by[a][s] - by[b][s] for s in sorted(set(by[a]) & set(by[b]))]


def main_hidden(results: list[dict]) -> int:
    """The student width every variant ran at (the others are the size chart's)."""
    return statistics.mode(r["hidden"] for r in results)


def summarise(results: list[dict], weights: list[dict] | None = None) -> tuple[str, list[dict]]:
    """The markdown: per (data set, regime) the best variant and the goals; the table, one row per
    (data set, regime, student size, variant); the teachers; the specialists' rule weights."""
    from ensemblekd.testing import markdown_table

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["regime"], r["hidden"], r["variant"]), []).append(r)
    order = {v: i for i, v in enumerate(VARIANTS)}
    rows = []
    for (dataset, regime, hidden, variant), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], kv[0][2], order.get(kv[0][3], len(order)))):
        alone = [x["student"] for x in groups.get((dataset, regime, hidden, "alone"), [])]
        ens = statistics.fmean(x["ensemble"] for x in rs)
        acc_mean, acc_std = mean_std([x["student"] for x in rs])
        gap = None
        if alone and variant != "alone":
            alone_mean = statistics.fmean(alone)
            # a gap to close only where the ensemble beats the student alone by a point (specialists: it does not)
            gap = (acc_mean - alone_mean) / (ens - alone_mean) if ens - alone_mean >= 0.01 else None
        rows.append({"dataset": dataset, "regime": regime, "hidden": hidden, "variant": variant, "mean": acc_mean,
                     "std": acc_std, "ensemble": ens, "gap_closed": gap, "n": len(rs),
                     "teachers": {k: statistics.fmean(x["teachers"][k] for x in rs) for k in rs[0]["teachers"]},
                     "params": rs[0]["params"]})
    def pm(r: dict) -> str:
        return f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}"

    def closed(r: dict) -> str:
        return "—" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"

    main = main_hidden(results) if results else None
    best_rows = []
    for dataset, regime in dict.fromkeys((r["dataset"], r["regime"]) for r in rows):
        mine = [r for r in rows if (r["dataset"], r["regime"], r["hidden"]) == (dataset, regime, main)]
        kd = [r for r in mine if r["variant"] != "alone"]
        alone = next((r for r in mine if r["variant"] == "alone"), None)
        if kd:
            best = max(kd, key=lambda r: r["mean"])
            best_rows.append([dataset, regime, best["variant"], pm(best), "—" if alone is None else pm(alone),
                              closed(best), best["n"]])
    teachers: dict[tuple[str, str], float] = {}  # (data set, teacher) -> test accuracy, as first seen
    for r in rows:
        for name, a in r["teachers"].items():
            teachers.setdefault((r["dataset"], name), a)
    lines = ["## Best variant per data set and regime", "",
             f"At the main student size, mlp[{main}]; gap closed against the variant's own ensemble.", "",
             markdown_table(["data set", "regime", "best variant", "test acc (mean ± std)", "alone", "gap closed",
                             "seeds"], best_rows, left=3),
             "", *goals(results, rows, main), "", "## Every run, mean over seeds", "",
             markdown_table(["data set", "regime", "student", "variant", "test acc (mean ± std)", "gap closed",
                             "ensemble", "seeds"],
                            [[r["dataset"], r["regime"], f"mlp[{r['hidden']}] ({r['params']:,} p)", r["variant"], pm(r),
                              closed(r), f"{100 * r['ensemble']:.2f}", r["n"]] for r in rows], left=4),
             "", "## Teachers", "",
             markdown_table(["data set", "teacher", "test acc"],
                            [[d, name, f"{100 * a:.2f}"] for (d, name), a in teachers.items()], left=2)]
    if weights:
        lines += ["", "## Specialists: the weight each rule gives the right specialist", "",
                  "On the train split, from the stored logits: the mean weight of the teacher of the row's group "
                  "(uniform: 1/3; at most 1/2 for entropy and ca_mkd, whose weights are (1 - share) / (K - 1)), "
                  "over all rows and over the labelled ones, and how often the mixed target's argmax at T = 4 "
                  "(what the student is taught) is the true label.", "",
                  markdown_table(["regime", "rule", "right specialist's weight", "on labelled rows",
                                  "mixed target accuracy"],
                                 [[w["regime"], w["rule"], f"{w['right_weight']:.3f}",
                                   "—" if w["right_weight_labelled"] is None else f"{w['right_weight_labelled']:.3f}",
                                   f"{100 * w['target_accuracy']:.2f}%"] for w in weights], left=2)]
    return "\n".join(lines), rows


def goals(results: list[dict], rows: list[dict], main: int | None) -> list[str]:
    """The goals, checked on paired per-seed differences (same seed, same data): one std is the
    std of those differences over seeds."""
    out = ["## Goals", ""]
    ran = {(r["dataset"], r["regime"]) for r in rows}

    def stat(diffs: list[float]) -> str:
        m, s = mean_std(diffs)
        return f"{100 * m:+.2f} ± {100 * s:.2f} points over {len(diffs)} seeds"

    for regime in ("full", "low"):
        if ("specialists", regime) not in ran:
            continue
        present = {r["variant"]: r for r in rows if (r["dataset"], r["regime"], r["hidden"]) ==
                   ("specialists", regime, main)}
        rules = [v for v in PER_SAMPLE_RULES if v in present]
        if "uniform" not in present or not rules:
            out.append(f"- (i) specialists, {regime} labels: not run (needs uniform and entropy or ca_mkd)")
            continue
        best = max(rules, key=lambda v: present[v]["mean"])
        diffs = paired(results, "specialists", regime, main, best, "uniform")
        m, s = mean_std(diffs)
        ok = m > 0.02 and m > s
        out.append(f"- (i) specialists, {regime} labels: best per-sample rule {best} minus uniform = {stat(diffs)}: "
                   f"{'MET' if ok else 'NOT MET'} (goal: > 2 points and > one std)")
    if ("digits", "low") in ran:
        kd = [r for r in rows if (r["dataset"], r["regime"], r["hidden"]) == ("digits", "low", main)
              and r["gap_closed"] is not None]
        if kd:
            best = max(kd, key=lambda r: r["gap_closed"])
            out.append(f"- (ii) digits, low labels: best gap closed {100 * best['gap_closed']:.0f}% ({best['variant']}): "
                       f"{'MET' if best['gap_closed'] >= 0.9 else 'NOT MET'} (goal: >= 90%)")
        else:
            out.append("- (ii) digits, low labels: not run (needs alone and a distilled variant)")
    if ("digits", "full") in ran:
        names = [r["variant"] for r in rows if (r["dataset"], r["regime"], r["hidden"]) == ("digits", "full", main)
                 and r["variant"] != "alone"]
        worse = []
        for v in names:
            diffs = paired(results, "digits", "full", main, v, "alone")
            m, s = mean_std(diffs) if diffs else (0.0, 0.0)
            if diffs and m < 0 and -m > s:
                worse.append(f"{v} ({stat(diffs)})")
        has_alone = any(r["variant"] == "alone" for r in rows if (r["dataset"], r["regime"]) == ("digits", "full"))
        if not has_alone or not names:
            out.append("- (iii) digits, full labels: not run (needs alone and a distilled variant)")
        else:
            out.append("- (iii) digits, full labels: variants worse than alone by more than one std: "
                       + (", ".join(worse) if worse else "none") + f" (of {len(names)})")
    return out


def chart(rows: list[dict], results: list[dict], path: Path) -> None:
    """Top: accuracy against student size (parameters), per data set and regime: alone vs. KD.
    Bottom: every variant's mean ± std at the main student size, per data set and regime."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["dataset"], r["regime"]) for r in rows))
    main = main_hidden(results)
    n_variants = max(sum(1 for r in rows if (r["dataset"], r["regime"], r["hidden"]) == (*p, main)) for p in panels)
    height = 1.2 + 0.3 * n_variants
    fig, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels), 3.8 + height), squeeze=False,
                             gridspec_kw={"height_ratios": [3.8, height]})
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
    for ax, (dataset, regime) in zip(axes[1], panels):
        mine = [r for r in rows if (r["dataset"], r["regime"], r["hidden"]) == (dataset, regime, main)]
        ys = list(range(len(mine)))[::-1]
        colours = {g: f"C{i}" for i, g in enumerate(GROUPS)}
        for y, r in zip(ys, mine):
            ax.errorbar([100 * r["mean"]], [y], xerr=[100 * r["std"]], fmt="o", capsize=3,
                        color=colours.get(VARIANTS.get(r["variant"], ("?",))[0], "k"))
        alone = next((r for r in mine if r["variant"] == "alone"), None)
        if alone:
            ax.axvline(100 * alone["mean"], color="gray", ls="--", lw=1, label="alone")
        uniform = next((r for r in mine if r["variant"] == "uniform"), None)
        if uniform:
            ax.axvline(100 * uniform["ensemble"], color="k", ls=":", lw=1, label="uniform ensemble")
        ax.set_yticks(ys, [r["variant"] for r in mine], fontsize=7)
        ax.set_xlabel(f"test accuracy (%), student mlp[{main}], mean ± std")
        ax.set_title(f"{dataset}, {regime} labels: variants", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        if alone or uniform:
            ax.legend(fontsize=7, loc="best")  # never over a variant's dot
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(saved: dict, out: Path, header: str) -> int:
    results, weights = saved["results"], saved.get("right_weight") or []
    text, rows = summarise(results, weights)
    (out / "quality.md").write_text(header + text + "\n")
    chart(rows, results, out / "quality.png")
    print(header + text)
    print(f"\nwrote {out / 'quality.md'}, {out / 'quality.png'}, {out / 'quality.json'}")
    return 0


# -- the plan and the run -----------------------------------------------------------------------
def make_plan(args) -> list[tuple[str, str, list[tuple[str, int]]]]:
    """(data set, regime, [(variant, student width)]) in run order."""
    if args.quick:
        return [(d, r, [(v, args.hidden) for v in vs]) for (d, r), vs in QUICK.items()]
    chosen = None if args.variants == "plan" else select_variants(args.variants)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    plan = []
    for dataset in args.datasets.split(","):
        if dataset not in DATASETS:
            raise SystemExit(f"--datasets: unknown '{dataset}'; choose from {list(DATASETS)}")
        for regime in args.regimes.split(","):
            planned = chosen or select_variants(",".join(PLAN.get((dataset, regime), [])))
            entries = [(v, args.hidden) for v in planned]
            entries += [(v, h) for h in sizes for v in SIZE_CHART.get((dataset, regime), ()) if v in planned]
            if entries:
                plan.append((dataset, regime, entries))
    return plan


def estimate_s(plan, epochs: int, seeds: int) -> tuple[int, float]:
    """(student runs, seconds): the runs, each RUN_S + EPOCH_S * epochs (a TA or 2 generations count
    twice), and each data set's fits and labels (a feature store labels again)."""
    runs, seconds = 0, 0.0
    for dataset, _, entries in plan:
        per_run = RUN_S + EPOCH_S.get(dataset, 0.1) * epochs
        runs += seeds * len(entries)
        seconds += seeds * sum(COST.get(v, 1) for v, _ in entries) * per_run
        seconds += SETUP_S.get(dataset, 20.0) * (1 + any(needs_features(v) for v, _ in entries)) / 2
    return runs, seconds


def prepare_data(dataset: str, out: Path, low_fraction: float) -> tuple[Path, Path]:
    from ensemblekd import testing

    full, low = out / dataset / "data" / "full", out / dataset / "data" / "low"
    if not (full / "test").exists():
        if dataset == "specialists":
            prepare_specialists(full)
        else:
            testing.tiny_data(full, dataset, shard_rows=128)
    if not (low / "test").exists():
        mask_labels(full, low, low_fraction, seed=0)
    if dataset == "specialists":
        fit_specialists(full, out / dataset / "teachers")
    return full, low


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_quality", help="output directory (default runs/bench_quality)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: digits low ca_mkd and specialists full alone, 1 seed, 3 epochs")
    p.add_argument("--datasets", default="digits,specialists,wine")
    p.add_argument("--regimes", default="full,low")
    p.add_argument("--variants", default="plan", help="'plan' (the full plan, PLAN: see above), 'all', or a comma "
                   f"list of groups {GROUPS} and names, run on every data set and regime chosen")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, default=32, help="the student's hidden width")
    p.add_argument("--sizes", default="", help="student widths for the size chart (digits, full labels: alone, uniform), e.g. 8,128")
    p.add_argument("--low-label-fraction", type=float, default=0.1)
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time, run nothing")
    p.add_argument("--summarise-only", action="store_true", help="rewrite the report and chart from OUT/quality.json")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    if args.summarise_only:
        saved = json.loads((out / "quality.json").read_text())
        saved = {"results": saved} if isinstance(saved, list) else saved  # quality.json before the specialists set
        return write_report(saved, out, saved.get("header", "") +
                            "Re-summarised from quality.json by `python tools/bench_quality.py --summarise-only`.\n\n")
    seeds = range(1 if args.quick else args.seeds)
    epochs = 3 if args.quick else args.epochs
    plan = make_plan(args)
    runs, estimate = estimate_s(plan, epochs, len(seeds))
    for dataset, regime, entries in plan:
        print(f"[bench] plan {dataset} {regime}: " + ", ".join(v if h == args.hidden else f"{v} h{h}" for v, h in entries))
    print(f"[bench] {runs} student runs ({len(seeds)} seeds, {epochs} epochs): estimated {estimate / 60:.0f} min "
          f"on 2 cores", flush=True)
    if args.dry_run:
        return 0

    import ensemblekd as ekd
    from ensemblekd.io.ray_session import ensure_ray, ray_session

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results, weights = [], []
    with ray_session():
        for dataset in dict.fromkeys(d for d, _, _ in plan):
            full, low = prepare_data(dataset, out, args.low_label_fraction)
            fitted = base_config(dataset, "full", full, out, epochs, args.hidden)
            ensure_ray(ekd.load_config(fitted, check=False).ray)  # one Ray for every run (a no-op once started)
            # fits the teachers once on full labels (specialists: fitted above) and labels the full store
            ekd.label(fitted, progress=False)
            for _, regime, entries in [e for e in plan if e[0] == dataset]:
                data = full if regime == "full" else low
                base = base_config(dataset, regime, data, out, epochs, args.hidden)
                ekd.label(base, progress=False)  # labels once per regime (a no-op for full)
                if any(needs_features(v) for v, _ in entries):
                    ekd.label(base_config(dataset, regime, data, out, epochs, args.hidden, features=True), progress=False)
                if dataset == "specialists":
                    weights += right_specialist_weights(base, regime, full)
                for seed in seeds:
                    for variant, hidden in entries:
                        cfg = variant_config(base_config(dataset, regime, data, out, epochs, hidden,
                                                         features=needs_features(variant)), variant, seed, hidden,
                                             f"{dataset} {regime}")
                        t0 = time.perf_counter()
                        rows = run_variant(cfg)
                        teacher_rows = [r for r in rows.values() if r.role == "teacher"]
                        results.append({"dataset": dataset, "regime": regime, "variant": variant,
                                        "group": VARIANTS[variant][0], "seed": seed, "hidden": hidden,
                                        "student": rows["student"].accuracy, "params": rows["student"].params,
                                        "ensemble": rows["ensemble"].accuracy,
                                        "teachers": {r.model: r.accuracy for r in teacher_rows},
                                        "teacher_params": {r.model: r.params for r in teacher_rows},
                                        "seconds": time.perf_counter() - t0})
                        (out / "quality.partial.json").write_text(json.dumps({"results": results,
                                                                              "right_weight": weights}))
                        print(f"[bench] {dataset} {regime} {variant:22s} h{hidden:<4d} seed {seed}: "
                              f"{100 * results[-1]['student']:.2f}% ({results[-1]['seconds']:.0f} s)", flush=True)
    minutes = (time.perf_counter() - start) / 60
    header = (f"Generated by `python tools/bench_quality.py{' --quick' if args.quick else ''}` in {minutes:.1f} min "
              f"(estimated {estimate / 60:.0f}) on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; {runs} student "
              f"runs, {epochs} epochs, {len(seeds)} seed(s), T = 4, alpha = 0.5, low-label regime: "
              f"{100 * args.low_label_fraction:.0f}% of train labels. Gap closed = (KD - alone) / (ensemble - alone).\n\n")
    saved = {"header": header, "results": results, "right_weight": weights}
    (out / "quality.json").write_text(json.dumps(saved, indent=1))
    return write_report(saved, out, header)


if __name__ == "__main__":
    sys.exit(main())
