#!/usr/bin/env python3
"""Two tokenizers teaching one student (configs/two_families.yaml): what each teacher buys, at one
token budget and seed per row:

  next_token   the pruned SmolLM2 student trained on the next tokens alone (distill.alpha 1)
  smollm2      distilled from SmolLM2 alone (its own tokenizer is the student's)
  gemma3       distilled from Gemma 3 alone, across tokenizers (static weights {smollm2: 0, gemma3: 1}:
               SmolLM2 stays configured, as the token task needs a teacher of the student's
               tokenizer, but weighs nothing; positions Gemma 3 is not aligned at get no KD term)
  both         the config: both families, weighted by validation top-1 in their own tokens
  both_kl      both, with Gemma 3 taught by the mapped KL alone (distill.uld_weight 0), seed 0 only: does
               ULD on the unmapped tokens help?

each over --seeds seeds (trainer.seed orders the batches), with held-out bits per byte (the measure
that compares tokenizers), perplexity and top-1 in the student's tokens, and the seconds of a run.
Before them, each teacher is labelled on its own (SmolLM2, then Gemma 3 into the same store): label
tokens/s and stored bytes per token (per the teacher's own tokens) for each; after them, each
teacher's forward tokens/s (1 thread, batch 64).

The token budget is the first --train-shards shards of the pydoc train split, labelled into a store
of its own; every run is one epoch of it through Ray Train + DeepSpeed, as the config trains.
Writes OUT/crosstok.md and OUT/crosstok.json.

    python tools/bench_crosstok.py                        # 3 seeds, 1 train shard (about 14k tokens)
    python tools/bench_crosstok.py --seeds 1 --out /tmp/c

A finished run's row is kept in its run directory and reused by a later call with the same config
and --work (bench_common.kept_run).

Internals measured directly:
  ensemblekd.api: label and distill as a user calls them (ekd.*)
  Task.quality (bits per byte, perplexity, top-1); the store's manifest and shards (bytes per token)
"""

from __future__ import annotations

import copy
import time
from bench_common import budget_arguments, kept_run, open_budget, test_quality, tokens_per_s, variant

import ensemblekd as ekd
from ensemblekd.store import Store
from ensemblekd.tasks import get_task
from ensemblekd.teachers import kind_of
from ensemblekd.testing import machine, markdown_table, median_spread, write_results

VARIANTS = ("next_token", "smollm2", "gemma3", "both", "both_kl")


def stored(store: Store, teacher: str, split: str) -> tuple[int, int]:
    """(bytes, target tokens) of one teacher's shards of a split, from the manifest."""
    entries = store.manifest["shards"][split][teacher].values()
    return sum(e["bytes"] for e in entries), sum(e["tokens"] for e in entries)


def main() -> None:
    ap = budget_arguments(__doc__, "/tmp/ensemblekd-bench-crosstok")
    ap.add_argument("--no-kl-only", action="store_true", help="skip both_kl (one more run of both families)")
    args = ap.parse_args()
    started = time.perf_counter()
    _, cfg = open_budget(args, "two_families.yaml", "bench-crosstok")
    labelling = {}
    for upto in (1, 2):                               # SmolLM2 alone, then Gemma 3 into the same store
        step = {**copy.deepcopy(cfg), "teachers": cfg["teachers"][:upto]}
        t0 = time.perf_counter()
        result = ekd.label(step, progress=False)
        seconds = time.perf_counter() - t0
        labelling[cfg["teachers"][upto - 1]["name"]] = {"seconds": seconds if result.shards else None,
                                                        "shards": result.shards}   # None: labelled by an earlier call
    store = Store.open(cfg["store"]["uri"])
    for name, row in labelling.items():
        size, row["train_tokens"] = stored(store, name, "train")
        row["bytes_per_token"] = size / row["train_tokens"]
        row["labelled_tokens"] = sum(stored(store, name, split)[1] for split in ("train", "val", "test"))
    eval_cfg = ekd.load_config(variant(cfg, "eval", 0))
    teachers = [t["name"] for t in cfg["teachers"]]
    batch = get_task("token").latency_batch(get_task("token").latency_inputs(eval_cfg)[0], 64)
    runs: list[dict] = []
    gemma_alone = {**{k: v for k, v in cfg["distill"].items() if k != "gamma"},
                   "weighting": "static", "weights": {"smollm2": 0.0, "gemma3": 1.0}}

    def measure(student) -> dict:
        q = test_quality(eval_cfg, student, ("student", *teachers))
        return {**q["student"], "teachers": {n: q[n] for n in teachers}}

    for seed in range(args.seeds):
        kept_run(runs, "both", seed, variant(cfg, "both", seed), measure)
        kept_run(runs, "next_token", seed, variant(cfg, "next_token", seed, distill={"alpha": 1.0}), measure)
        kept_run(runs, "smollm2", seed, variant({**cfg, "teachers": cfg["teachers"][:1]}, "smollm2", seed), measure)
        kept_run(runs, "gemma3", seed, variant({**cfg, "distill": gemma_alone}, "gemma3", seed), measure)
    if not args.no_kl_only:
        kept_run(runs, "both_kl", 0, variant(cfg, "both_kl", 0, distill={"uld_weight": 0.0}), measure)
    speed = {}
    for t in eval_cfg.teachers:                       # 64 x latency_tokens ids: a forward costs the same whichever
        speed[t.name] = tokens_per_s(kind_of(t).load(eval_cfg, t), batch)
    report(args, runs, speed, labelling, store.manifest.get("codec", "float16"), time.perf_counter() - started)


def report(args, runs: list[dict], speed: dict, labelling: dict, codec: str, seconds: float) -> None:
    teachers = runs[0]["teachers"]
    train_tokens = labelling["smollm2"]["train_tokens"]
    rows, table = [], []
    for name in VARIANTS:
        found = [r for r in runs if r["variant"] == name]
        if not found:
            continue
        bpb, spread = median_spread([r["bits_per_byte"] for r in found])
        ppl = median_spread([r["perplexity"] for r in found])[0]
        run_s = median_spread([r["seconds"] for r in found])[0]
        rows.append({"variant": name, "bits_per_byte": bpb, "spread": spread, "perplexity": ppl,
                     "top1": median_spread([r["accuracy"] for r in found])[0], "run_seconds": run_s,
                     "seeds": len(found)})
        table.append([name, f"{bpb:.4f}", f"{min(r['bits_per_byte'] for r in found):.4f}.."
                      f"{max(r['bits_per_byte'] for r in found):.4f}", f"{ppl:.2f}", f"{100 * rows[-1]['top1']:.2f}%",
                      f"{run_s:.0f}", str(len(found))])
    by = {r["variant"]: r for r in rows}
    best_single = min(("smollm2", "gemma3"), key=lambda n: by[n]["bits_per_byte"])
    gain = by[best_single]["bits_per_byte"] - by["both"]["bits_per_byte"]
    spread = max(by["both"]["spread"], by[best_single]["spread"])
    lines = ["# Two tokenizers, one student: what each teacher buys (configs/two_families.yaml)", "",
             f"Generated by `python tools/bench_crosstok.py --seeds {args.seeds} --train-shards {args.train_shards}` "
             f"on {time.strftime('%Y-%m-%d %H:%M')} in {seconds / 60:.1f} min; {train_tokens:,} train tokens "
             f"(the student's), one epoch a run; store codec {codec}.", "",
             "Teachers on the test split and their labelling of the train split:", "",
             markdown_table(["teacher", "bits/B", "ppl (student's tokens)", "tokens/s (median)", "spread",
                             "label tokens/s", "stored B/token"],
                            [[n, f"{t['bits_per_byte']:.4f}", f"{t['perplexity']:.2f}" if "perplexity" in t else "-",
                              f"{median_spread(speed[n])[0]:,.0f}", f"{min(speed[n]):,.0f}..{max(speed[n]):,.0f}",
                              "-" if labelling[n]["seconds"] is None
                              else f"{labelling[n]['labelled_tokens'] / labelling[n]['seconds']:.1f}",
                              f"{labelling[n]['bytes_per_token']:.1f}"] for n, t in teachers.items()]), "",
             "(tokens/s: a forward of 64 sequences x evaluate.latency_tokens of a teacher's own tokens, 1 thread, "
             "3 timed calls after an untimed one; label tokens/s: its target tokens of all three splits over the "
             "wall time of its label call, '-' where an earlier call labelled them; stored B/token: its train shards' bytes "
             "over its own target tokens.)", "",
             "Students (the same pruned SmolLM2, the same tokens; median over seeds):", "",
             markdown_table(["variant", "bits/B (median)", "spread", "ppl", "top-1", "s a run (distill + test)", "seeds"], table), "",
             f"Both families against the better single teacher ({best_single}): {gain:+.4f} bits/B "
             f"({'more' if gain > spread else 'not more'} than the larger spread, {spread:.4f}); Gemma 3 alone against "
             f"the next tokens alone: {by['next_token']['bits_per_byte'] - by['gemma3']['bits_per_byte']:+.4f} bits/B."]
    write_results(args.out, "crosstok", {"runs": runs, "speed": speed, "labelling": labelling, "codec": codec,
                                         "gain_over_best_single": gain, "best_single": best_single,
                                         "machine": machine()}, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
