"""The `ensemblekd` command line: run | label | distill | evaluate | validate | inspect | prepare.

Exit 0 on success. Bad input exits 2 with one line on stderr naming the problem and the fix
(`--debug` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ensemblekd", description="Multi-teacher ensemble knowledge distillation.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_text)
        sp.add_argument("config", help="YAML config, e.g. configs/digits.yaml")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config key (repeatable), e.g. --set trainer.epochs=3")
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        return sp

    with_config("run", "all stages: prepare, fit, label, distill, evaluate")
    lab = with_config("label", "fit teachers if asked, then write their logits into the store")
    lab.add_argument("--repair", action="store_true", help="verify every committed shard first; relabel corrupt ones")
    with_config("distill", "train the student from the store")
    ev = with_config("evaluate", "teachers, ensemble and student on the test split")
    ev.add_argument("--student", help="student state dict (default: trainer.output_dir/student.pt)")
    with_config("validate", "check a config without running anything")

    ins = sub.add_parser("inspect", help="teachers, splits, shards, rows, bytes of a store; verifies checksums")
    ins.add_argument("store", help="store URI")
    ins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    pre = sub.add_parser("prepare", help="write a built-in scikit-learn data set as Parquet splits")
    pre.add_argument("name", help="digits | breast_cancer | wine | iris")
    pre.add_argument("out", help="output directory (any fsspec URI)")
    pre.add_argument("--shard-rows", type=int, default=256, help="rows per Parquet shard (default 256)")
    pre.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return p


def _load(args, check: bool = True):
    from ensemblekd.config import load_config

    return load_config(args.config, args.overrides, check=check)


def cmd_run(args) -> int:
    from ensemblekd.pipeline import run

    cfg = _load(args, check=False)
    result = run(cfg, progress=not args.no_progress)
    print()
    print(result["table"])
    print()
    print(f"MLflow run: {result['run_id']}  ({result['tracking_uri']})")
    print(f"student: {result['student']}   store: {result['store']}   wall time: {result['seconds']:.1f} s")
    return 0


def cmd_label(args) -> int:
    from ensemblekd.pipeline import label_stage
    from ensemblekd.ray_session import ray_session

    cfg = _load(args, check=False)
    with ray_session():
        result = label_stage(cfg, progress=not args.no_progress, repair=args.repair)
    for shard in result["repaired"]:
        print(f"repaired {shard}")
    print(f"labelled {result['shards']} shard(s), {result['rows']:,} rows in {result['seconds']:.1f} s into {cfg.store.uri}")
    return 0


def cmd_distill(args) -> int:
    from ensemblekd import tracking
    from ensemblekd.distill import preflight
    from ensemblekd.pipeline import distill_stage
    from ensemblekd.ray_session import ray_session

    cfg = _load(args)
    preflight(cfg)
    with ray_session(), tracking.mlflow_run(cfg, "distill") as info:
        result = distill_stage(cfg, info, progress=not args.no_progress)
        tracking.log_student(cfg, result["student"])
    m = result["metrics"]
    print(f"student: {result['student']}  val accuracy {100 * m['val_accuracy']:.2f}%  "
          f"({result['seconds']:.1f} s)  MLflow run {info['run_id']}")
    return 0


def cmd_evaluate(args) -> int:
    from ensemblekd import tracking
    from ensemblekd.evaluate import evaluate, format_table
    from ensemblekd.pipeline import log_report, student_path

    cfg = _load(args)
    with tracking.mlflow_run(cfg, "evaluate") as info:
        assistants = [a.name for a in cfg.distill.assistants] if cfg.distill.strategy == "assistant" else []
        report = evaluate(cfg, args.student or student_path(cfg), assistants)
        log_report(report)
    print(format_table(report["rows"]))
    print(f"MLflow run: {info['run_id']}")
    return 0


def cmd_validate(args) -> int:
    cfg = _load(args, check=False)
    from ensemblekd.config import check_inputs

    check_inputs(cfg, check_data=True)
    print(f"{args.config}: ok ({len(cfg.teachers)} teachers, strategy {cfg.distill.strategy}/{cfg.distill.weighting}, "
          f"{cfg.trainer.num_workers} workers, ZeRO-{cfg.trainer.zero_stage})")
    return 0


def cmd_inspect(args) -> int:
    from ensemblekd.evaluate import _human
    from ensemblekd.storage import check_reachable
    from ensemblekd.store import Store

    check_reachable(args.store, "STORE_URI")  # endpoint and credentials from AWS_* variables
    store = Store.open(args.store)
    m = store.m
    print(f"store {store.uri}: schema v{m['schema_version']}, {m['num_classes']} classes, {m['dtype']}")
    for name, t in sorted(m["teachers"].items()):
        acc = t.get("val_accuracy")
        print(f"  teacher {name}: fingerprint {t['fingerprint']}  {t['spec']['model']}"
              + (f"  val acc {100 * acc:.2f}%" if acc is not None else ""))
    checks = store.verify()
    bad = [c for c in checks if not c[3]]
    for split, inputs in sorted(m["inputs"].items()):
        for name in sorted(m["teachers"]):
            entries = m["shards"].get(split, {}).get(name, {})
            rows = sum(e["rows"] for e in entries.values())
            size = sum(e["bytes"] for e in entries.values())
            print(f"  {split:5s} {name}: {len(entries)}/{len(inputs)} shards, {rows:,} rows, {_human(size)}")
    for split, name, index, _, reason in bad:
        print(f"  CORRUPT {split}/{name}/shard {index}: {reason}")
    print(f"checksums: {len(checks) - len(bad)}/{len(checks)} verified" + ("" if not bad else f", {len(bad)} bad"))
    return 1 if bad else 0


def cmd_prepare(args) -> int:
    from ensemblekd.config import resolve_uri
    from ensemblekd.data import prepare

    out = resolve_uri(args.out)
    paths = prepare(args.name, out, shard_rows=args.shard_rows)
    print(f"wrote {args.name}: " + ", ".join(f"{k} -> {v}" for k, v in paths.items()))
    return 0


COMMANDS = {"run": cmd_run, "label": cmd_label, "distill": cmd_distill, "evaluate": cmd_evaluate,
            "validate": cmd_validate, "inspect": cmd_inspect, "prepare": cmd_prepare}


def main(argv: list[str] | None = None) -> int:
    from ensemblekd.errors import UserError

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"ensemblekd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ensemblekd: interrupted; committed work is kept, re-run to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
