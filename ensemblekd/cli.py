"""The `ensemblekd` command line: run | label | distill | evaluate | compare | export | validate | inspect | prepare.

A thin layer over the public API (ensemblekd.api): parse, call, print. Exit 0 on success. Bad
input exits 2 with one line on stderr naming the problem and the fix (`--debug` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other bad input (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def count(least: int):
    """An argparse type: an integer >= least."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be {least} or more, got {value}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ensemblekd", description="Multi-teacher ensemble knowledge distillation.")
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
    ev.add_argument("--warmup", type=count(0), help="untimed calls before timing each model (default: evaluate.warmup, 20)")
    ev.add_argument("--repeats", type=count(0), help="timed calls per model and batch size (default: evaluate.repeats, "
                    "200; 0: no latency)")
    with_config("validate", "check a config without running anything")

    ins = sub.add_parser("inspect", help="teachers, splits, shards, rows, bytes of a store; verifies checksums")
    ins.add_argument("store", help="store URI")
    ins.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    pre = sub.add_parser("prepare", help="write a built-in data set as Parquet splits")
    pre.add_argument("name", help="digits | breast_cancer | wine | iris | markov | pydoc")
    pre.add_argument("out", help="output directory (any fsspec URI)")
    pre.add_argument("--shard-rows", type=count(1), help="rows per Parquet shard (default 256; pydoc 64)")
    pre.add_argument("--tokenizer", help="pydoc: the tokenizer directory or .gguf file that tokenizes the text")
    pre.add_argument("--seq-len", type=count(2), default=256, help="pydoc: tokens per sequence (default 256)")
    pre.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    cmp = sub.add_parser("compare", help="one row per run of an MLflow experiment: settings, student quality and cost")
    cmp.add_argument("--experiment", required=True, help="MLflow experiment name (tracking.experiment)")
    cmp.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    cmp.add_argument("--sort", metavar="COLUMN", help="sort by this column (the names of --format csv)")
    cmp.add_argument("--desc", action="store_true", help="sort in descending order")
    cmp.add_argument("--format", choices=("markdown", "csv", "json"), default="markdown", help="default markdown")
    cmp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    exp = sub.add_parser("export", help="register a run's student in the MLflow Model Registry, ready to serve")
    exp.add_argument("run_id", nargs="?", metavar="RUN_ID", help="the MLflow run of `run` or `distill`")
    exp.add_argument("--config", help="instead of RUN_ID: log this config's trainer.output_dir/student.pt in a new run")
    exp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a key of --config (repeatable)")
    exp.add_argument("--name", help="registered model name (default: <experiment>-student)")
    exp.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here")
    exp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    return p


def cmd_run(args) -> int:
    from ensemblekd import api

    result = api.run(args.config, args.overrides, progress=not args.no_progress)
    print()
    print(result.table)
    print()
    assert result.distill is not None  # api.run always sets it
    _print_levels(result.distill.chain)
    print(f"MLflow run: {result.run_id}  ({result.tracking_uri})")
    print(f"student: {result.student}   store: {result.store}   wall time: {result.seconds:.1f} s")
    return 0


def _print_levels(chain: list[dict]) -> None:
    """The levels of a chain above the student (TAKD assistants, born-again generations), first to last."""
    for level in chain[:-1]:
        print(f"{level['name']}: {level['student']}  val accuracy {100 * level['val_accuracy']:.2f}%")


def cmd_label(args) -> int:
    from ensemblekd import api

    result = api.label(args.config, args.overrides, progress=not args.no_progress, repair=args.repair)
    for fit in result.fitted:
        acc = "n/a" if fit["val_accuracy"] is None else f"{100 * fit['val_accuracy']:.2f}%"
        print(f"fitted teacher '{fit['name']}': val accuracy {acc} ({fit['seconds']:.1f} s)")
    for shard in result.repaired:
        print(f"repaired {shard}")
    pools = ", ".join(f"{p['replicas']} × {'+'.join(p['teachers'])}" for p in result.actors)
    print(f"labelled {result.shards} shard(s), {result.rows:,} rows in {result.seconds:.1f} s into {result.store}"
          + (f" (actors: {pools})" if pools else ""))
    return 0


def cmd_distill(args) -> int:
    from ensemblekd import api

    result = api.distill(args.config, args.overrides, progress=not args.no_progress)
    _print_levels(result.chain)
    print(f"student: {result.student}  val accuracy {100 * result.metrics['val_accuracy']:.2f}%  "
          f"({result.seconds:.1f} s)  MLflow run {result.run_id}")
    return 0


def cmd_evaluate(args) -> int:
    from ensemblekd import api

    result = api.evaluate(args.config, args.overrides, student=args.student, warmup=args.warmup, repeats=args.repeats)
    print(result.table)
    print(f"MLflow run: {result.run_id}")
    return 0


def cmd_validate(args) -> int:
    from ensemblekd import api

    cfg = api.load_config(args.config, args.overrides)
    print(f"{args.config}: ok ({len(cfg.teachers)} teachers, strategy {cfg.distill.strategy}/{cfg.distill.weighting}, "
          f"{cfg.trainer.num_workers or 'no'} workers{' (in process)' if not cfg.trainer.num_workers else ''}, ZeRO-{cfg.trainer.zero_stage})")
    return 0


def cmd_inspect(args) -> int:
    from ensemblekd import api
    from ensemblekd.tables import human_bytes

    store = api.open_store(args.store)  # endpoint and credentials from AWS_* variables
    m = store.manifest
    print(f"store {store.uri}: schema v{m['schema_version']}, task {m.get('task')}, {store.describe()}")
    for name, t in sorted(m["teachers"].items()):
        acc, spec = t.get("val_accuracy"), t["spec"]
        print(f"  teacher {name}: fingerprint {t['fingerprint']}  {spec.get('model') or spec.get('pretrained')}"
              + (f" ({spec['kind']})" if spec.get("kind") else "") + (f"  val acc {100 * acc:.2f}%" if acc is not None else ""))
    checks = store.verify()
    bad = [c for c in checks if not c[3]]
    for split, inputs in sorted(m["inputs"].items()):
        for name in sorted(m["teachers"]):
            entries = m["shards"].get(split, {}).get(name, {})
            rows = sum(e["rows"] for e in entries.values())
            size = sum(e["bytes"] for e in entries.values())
            units = sum(e.get(f"{store.unit}s", 0) for e in entries.values())
            print(f"  {split:5s} {name}: {len(entries)}/{len(inputs)} shards, {rows:,} rows"
                  + (f", {units:,} {store.unit}s" if store.unit != "row" else "") + f", {human_bytes(size)}")
    for split, name, index, _, reason in bad:
        print(f"  CORRUPT {split}/{name}/shard {index}: {reason}")
    print(f"checksums: {len(checks) - len(bad)}/{len(checks)} verified" + ("" if not bad else f", {len(bad)} bad"))
    return 1 if bad else 0


def cmd_prepare(args) -> int:
    from ensemblekd.data.builtin import NEEDS_TOKENIZER, prepare
    from ensemblekd.data.text import prepare_pydoc
    from ensemblekd.errors import UserError
    from ensemblekd.io.fs import resolve_uri

    if args.name in NEEDS_TOKENIZER:
        if not args.tokenizer:
            raise UserError(f"prepare {args.name}: real text needs --tokenizer (a tokenizer directory or .gguf file)")
        paths = prepare_pydoc(resolve_uri(args.out), args.tokenizer, args.seq_len, args.shard_rows or 64)
    else:
        paths = prepare(args.name, resolve_uri(args.out), shard_rows=args.shard_rows or 256)
    print(f"wrote {args.name}: " + ", ".join(f"{k} -> {v}" for k, v in paths.items()))
    return 0


def cmd_compare(args) -> int:
    from ensemblekd.stages.compare import compare, render

    rows = compare(args.experiment, args.tracking_uri, args.sort, args.desc)
    print(render(rows, args.format))
    if not rows:
        print(f"no run in experiment '{args.experiment}' has a student report", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    from ensemblekd import api

    result = api.export(args.run_id, args.config, args.overrides, args.name, args.tracking_uri)
    print(f"registered '{result['name']}' version {result['version']} from MLflow run {result['run_id']} "
          f"({result['tracking_uri']})")
    print(f"serve it:  {result['serve']}")
    return 0


COMMANDS = {"run": cmd_run, "label": cmd_label, "distill": cmd_distill, "evaluate": cmd_evaluate, "compare": cmd_compare,
            "validate": cmd_validate, "inspect": cmd_inspect, "prepare": cmd_prepare, "export": cmd_export}


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
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM while an MLflow run is open (tracking.Terminated)
        from ensemblekd.tracking import Terminated

        return _stopped(isinstance(exc, Terminated))
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        return _stopped(True)  # SIGTERM after ray.init, whose handler exits with sys.exit(SIGTERM)
    except BrokenPipeError:  # `ensemblekd inspect STORE | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 1


def _stopped(terminated: bool) -> int:
    """One line, no traceback; the shell's codes for death by SIGTERM (143) or SIGINT (130)."""
    print(f"ensemblekd: {'terminated' if terminated else 'interrupted'}; committed work is kept, re-run to resume",
          file=sys.stderr)
    return 143 if terminated else 130


if __name__ == "__main__":
    sys.exit(main())
