#!/usr/bin/env python3
"""What each part of a student cut from SmolLM2 buys (student.init, configs/smollm2.yaml), at one
token budget and seed per row:

  pruned         the config's pruned SmolLM2, untrained
  next_token     pruned, then trained on the next tokens alone (distill.alpha 1)
  mixed          pruned, then distilled from the ensemble with the next tokens mixed in (the config:
                 alpha 0.5, accuracy weighting)
  smollm2_only   pruned, then distilled from SmolLM2 alone (alpha 0)
  ensemble       pruned, then distilled from the ensemble alone (alpha 0; so are the shapes below)
  random         the same shape from random weights (lm.from_config), trained on the next tokens
                 at the from-scratch learning rate (3e-3)

each with held-out perplexity and top-1 over the test split, against the ensemble's; next_token,
mixed and ensemble over --seeds seeds (median and spread: trainer.seed orders the batches). Then the
tokens/s of SmolLM2 and of each student shape (batch 64 x evaluate.latency_tokens, 1 thread, the
median of 3 timed calls after an untimed one, with their spread), and the curve of perplexity against kept
parameters, untrained, for depth only (blocks by influence), width only (MLP channels) and both;
the three equal-size shapes of the curve are also distilled from the ensemble on the same tokens.

The token budget is the first --train-shards shards of the pydoc train split (the config's data,
written once), labelled into a store of its own; every training run is one epoch of it through
Ray Train + DeepSpeed, as the config trains. Writes OUT/prune.md, OUT/prune.json, OUT/prune_curve.png.

    python tools/bench_prune.py                          # 3 seeds, 1 train shard (about 14k tokens)
    python tools/bench_prune.py --seeds 1 --no-shapes --out /tmp/p

A finished training run's row is kept in its run directory with the run's config, in place of its
checkpoints and student (4 GB a run), and reused by a later call with the same config and --work
(so an interrupted benchmark goes on where it stopped).

Internals measured directly:
  ensemblekd.api: label and distill as a user calls them (ekd.*)
  ensemblekd.prune: measure, plan, prune (the curve); Task.quality (perplexity, top-1)
  ensemblekd.stages.evaluate: measure_latency, one_thread
"""

from __future__ import annotations

import os
import time

from bench_common import budget_arguments, kept_run, open_budget, test_quality, tokens_per_s, variant

import ensemblekd as ekd
from ensemblekd import prune
from ensemblekd.lm import CausalLM
from ensemblekd.models import build_student, count_parameters
from ensemblekd.tasks import get_task
from ensemblekd.teachers import kind_of
from ensemblekd.testing import machine, markdown_table, median_spread, write_results

SHAPES = {"depth": {"layers": 20}, "width": {"intermediate_size": 768},
          "both": {"layers": 26, "intermediate_size": 1024}}
CURVE = {"depth": [{"layers": n} for n in (26, 20, 16)],
         "width": [{"intermediate_size": n} for n in (1152, 768, 512)],
         "both": [{"layers": 28, "intermediate_size": 1280}, {"layers": 26, "intermediate_size": 1024},
                  {"layers": 20, "intermediate_size": 768}]}


def with_shape(cfg: dict, shape: dict, name: str) -> dict:
    init = {**{k: v for k, v in cfg["student"]["init"].items() if k not in ("layers", "intermediate_size")}, **shape,
            "path": f"runs/bench/init-{name}"}
    return {**cfg, "student": {"init": init}}


def quality(eval_cfg, student) -> dict:
    return test_quality(eval_cfg, student, ("student", "ensemble", "smollm2"))


def main() -> None:
    ap = budget_arguments(__doc__, "/tmp/ensemblekd-bench-prune")
    ap.add_argument("--no-shapes", action="store_true", help="skip distilling the curve's equal-size depth and "
                    "width shapes (two runs and two prunings)")
    args = ap.parse_args()
    started = time.perf_counter()
    base, cfg = open_budget(args, "smollm2.yaml", "bench-prune")
    cfg["distill"]["alpha"] = 0.0   # pure distillation unless a variant says otherwise
    ekd.label(cfg, progress=False)
    eval_cfg = ekd.load_config(variant(cfg, "eval", 0))
    runs: list[dict] = []

    def distilled(name: str, seed: int, run_cfg: dict) -> dict:
        def measure(student) -> dict:
            q = quality(eval_cfg, student)
            return {**q["student"], "ensemble": q["ensemble"]["perplexity"], "smollm2": q["smollm2"]["perplexity"]}
        return kept_run(runs, name, seed, run_cfg, measure)

    own = with_shape(cfg, {k: base["student"]["init"].get(k) for k in ("layers", "intermediate_size")}, "config")
    for seed in range(args.seeds):
        distilled("ensemble", seed, variant(own, "ensemble", seed))
        distilled("next_token", seed, variant(own, "next_token", seed, distill={"alpha": 1.0}))
        distilled("mixed", seed, variant(own, "mixed", seed, distill={"alpha": 0.5}))
    distilled("smollm2_only", 0, variant({**own, "teachers": [t for t in own["teachers"] if t["name"] == "smollm2"]},
                                         "smollm2_only", 0))   # one teacher: the accuracy rule gives it weight 1
    init_dir = "runs/bench/init-config"
    distilled("random", 0, variant({**own, "student": {"model": "ensemblekd.lm:from_config",
                                                       "kwargs": {"path": init_dir}}}, "random", 0,
                                   trainer={"lr": 3e-3}))
    pruned = build_student(ekd.load_config(variant(own, "pruned", 0)).student)
    runs.append({"variant": "pruned", "seed": 0, **quality(eval_cfg, pruned)["student"],
                 "params": count_parameters(pruned)})
    own_shape = {k: v for k, v in own["student"]["init"].items() if k in ("layers", "intermediate_size") and v is not None}
    for shape_name, shape in SHAPES.items():
        if args.no_shapes and shape != own_shape:
            continue
        if shape == own_shape:  # the config's own shape: its seed-0 ensemble run
            runs.append({**next(r for r in runs if r["variant"] == "ensemble"), "variant": f"ensemble_{shape_name}"})
            continue
        distilled(f"ensemble_{shape_name}", 0, variant(with_shape(cfg, shape, shape_name), f"ensemble_{shape_name}", 0))

    # speed and the untrained curve: SmolLM2 loaded once, scored once on the config's calibration sample
    teacher_cfg = next(t for t in eval_cfg.teachers if t.name == "smollm2")
    teacher = kind_of(teacher_cfg).load(eval_cfg, teacher_cfg)
    x, _ = get_task("token").latency_inputs(eval_cfg)
    x = get_task("token").latency_batch(x, 64)
    speed = {"smollm2": tokens_per_s(teacher, x)}
    init = eval_cfg.student.init
    assert init is not None
    scores = prune.measure(teacher, get_task("token").calibration(eval_cfg, init.calibration, init.batch_size))
    full = count_parameters(teacher)
    curve = []
    for mode, points in CURVE.items():
        for point in points:
            kept = prune.plan(teacher, scores, point.get("layers"),
                              widths={"intermediate_size": point.get("intermediate_size")})
            student = CausalLM(prune.prune(teacher, scores, kept))
            row = {"mode": mode, **point, "params": count_parameters(student), "share": count_parameters(student) / full,
                   **quality(eval_cfg, student)["student"]}
            if point in SHAPES.values() or point == own_shape:
                speed[f"{mode} {point}"] = tokens_per_s(student, x)
            curve.append(row)
            print(row, flush=True)
    report(args, runs, speed, curve, full, time.perf_counter() - started)


def report(args, runs: list[dict], speed: dict, curve: list[dict], full: int, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ens = runs[0]["ensemble"]
    table, rows = [], []
    for name in ("pruned", "next_token", "mixed", "smollm2_only", "ensemble", "random", "ensemble_depth", "ensemble_width",
                 "ensemble_both"):
        found = [r for r in runs if r["variant"] == name]
        if not found:
            continue
        ppl, spread = median_spread([r["perplexity"] for r in found])
        top1 = median_spread([r["accuracy"] for r in found])[0]
        rows.append({"variant": name, "perplexity": ppl, "spread": spread, "top1": top1, "seeds": len(found),
                     "kept": ens / ppl, "params": found[0]["params"]})
        table.append([name, f"{ppl:.2f}", f"{min(r['perplexity'] for r in found):.2f}..{max(r['perplexity'] for r in found):.2f}",
                      f"{100 * top1:.2f}%", f"{100 * ens / ppl:.1f}%", f"{found[0]['params']:,}", str(len(found))])
    median = {r["variant"]: r["perplexity"] for r in rows}
    gains = {name: (median["next_token"] - median[name]) / median["next_token"]
             for name in ("ensemble", "mixed") if name in median and "next_token" in median}
    teacher = median_spread(speed["smollm2"])[0]
    speed_rows = [[name, f"{median_spread(v)[0]:,.0f}", f"{min(v):,.0f}..{max(v):,.0f}",
                   f"{median_spread(v)[0] / teacher:.2f}x"] for name, v in speed.items()]
    lines = ["# Students cut from SmolLM2: what each part buys (configs/smollm2.yaml)", "",
             f"Generated by `python tools/bench_prune.py --seeds {args.seeds} --train-shards {args.train_shards}` on "
             f"{time.strftime('%Y-%m-%d %H:%M')} in {seconds / 60:.1f} min; SmolLM2 has {full:,} parameters; the "
             f"ensemble's test perplexity is {ens:.2f}.", "",
             markdown_table(["variant", "test ppl (median)", "spread", "top-1", "ensemble ppl / ppl", "params", "seeds"],
                            table), "",
             "Against next-token training of the same pruned student (median perplexity; goal: >= 10% lower): "
             + ("; ".join(f"{name} {100 * g:.1f}% lower" for name, g in gains.items()) or "not measured") + ".", "",
             markdown_table(["model", "tokens/s (median)", "spread", "vs SmolLM2"], speed_rows), "",
             "Untrained, perplexity against kept parameters:", "",
             markdown_table(["mode", "kept", "params", "share", "test ppl", "top-1"],
                            [[c["mode"], ", ".join(f"{k} {c[k]}" for k in ("layers", "intermediate_size") if k in c),
                              f"{c['params']:,}", f"{c['share']:.3f}", f"{c['perplexity']:.2f}",
                              f"{100 * c['accuracy']:.2f}%"] for c in curve])]
    fig = Figure(figsize=(6.5, 4.2), dpi=120)
    ax = fig.subplots()
    for mode in CURVE:
        points = [c for c in curve if c["mode"] == mode]
        ax.plot([c["share"] for c in points], [c["perplexity"] for c in points], marker="o", label=f"{mode}, untrained")
    for name in ("depth", "width", "both"):
        found = [r for r in runs if r["variant"] == f"ensemble_{name}"]
        if found:
            ax.scatter([found[0]["params"] / full], [found[0]["perplexity"]], marker="*", s=120,
                       label=f"{name}, distilled")
    ax.axhline(ens, color="tab:red", linestyle="--", linewidth=1, label="ensemble")
    ax.set_yscale("log")
    ax.set_xlabel("kept share of SmolLM2's parameters")
    ax.set_ylabel("test perplexity (log)")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "prune_curve.png"))
    write_results(args.out, "prune", {"runs": runs, "speed": speed, "curve": curve, "distill_gain": gains,
                                      "machine": machine()}, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
