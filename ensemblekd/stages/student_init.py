"""The student.init stage: cut the student out of a teacher (ensemblekd.prune) before it is distilled.

The teacher is loaded as its kind loads it for labelling, run on a calibration sample of the train
split (Task.calibration) with hooks that score its blocks and channels, and the pruned model is
written to student.init.path as an ordinary Hugging Face directory (weights, config, the teacher's
tokenizer) with RECORD: what was kept and why. The student config then builds the student from that
directory (config.PRUNED_STUDENT). The directory is reused while the teacher and student.init are
unchanged, so `distill` after `run`, or the baseline beside the student, start from the same weights.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from ensemblekd import prune, tracking
from ensemblekd.config import Config
from ensemblekd.errors import UserError
from ensemblekd.io import compat, fs
from ensemblekd.models import count_parameters
from ensemblekd.tasks import get_task
from ensemblekd.teachers import kind_of

RECORD = "init.json"


def init_student(cfg: Config, progress: bool = True) -> dict[str, Any] | None:
    """Write the pruned student of student.init (unless its directory is current); its record, or
    None without student.init."""
    init = cfg.student.init
    if init is None:
        return None
    if fs.is_remote(init.path or ""):
        raise UserError(f"student.init.path: '{init.path}' must be a local directory (on a cluster, on the shared "
                        "filesystem): Hugging Face reads it with from_pretrained")
    assert init.path is not None  # the config fills it in
    teacher = next(t for t in cfg.teachers if t.name == init.teacher)
    kind = kind_of(teacher)
    spec = {"fingerprint": kind.fingerprint(cfg, teacher), **init.model_dump(exclude={"path"})}
    record_path = os.path.join(init.path, RECORD)
    if os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record.get("spec") == spec:
            return record
    start = time.perf_counter()
    module = kind.load(cfg, teacher)
    batches = get_task(cfg.task).calibration(cfg, init.calibration, init.batch_size)
    from tqdm import tqdm

    with tqdm(total=len(batches), desc="init", unit="batch", disable=not progress, file=sys.stderr) as bar:
        scores = prune.measure(module, batches, "student.init", lambda n: bar.update(n - bar.n))
    widths = {w: getattr(init, w) for w in prune.WIDTHS}
    kept = prune.plan(module, scores, init.layers, init.choose, widths)
    pruned = prune.prune(module, scores, kept)
    record = {"spec": spec, "teacher": teacher.name, "layers": kept.layers, "teacher_layers": len(scores.influence),
              "influence": [round(v, 5) for v in scores.influence], "widths": kept.widths,
              "params": count_parameters(pruned), "teacher_params": kind.num_parameters(module),
              "calibration_tokens": scores.tokens, "seconds": round(time.perf_counter() - start, 1)}
    _write(init.path, pruned, _tokenizer(module, kind, teacher), record)
    return record


def _tokenizer(module, kind, teacher):
    """The teacher's tokenizer: the one its module carries (a text classifier), or its kind's file."""
    own = getattr(module, "tokenizer", None)
    if own is not None:
        return own
    path = kind.tokenizer(teacher)
    if path is None:
        return None
    from ensemblekd.lm import load_tokenizer

    return load_tokenizer(path)


def _write(path: str, model, tokenizer, record: dict[str, Any]) -> None:
    """The directory in full or not at all (fs.write_dir_atomic), the record last."""
    from ensemblekd.lm import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar of its own
    compat.deepspeed_on_cpu()  # save_pretrained asks DeepSpeed about ZeRO-3: no warning about the accelerator

    def write(tmp: str) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, RECORD), "w") as f:
            json.dump(record, f, indent=1)

    fs.write_dir_atomic(path, write, last=(RECORD,))


def read_record(init) -> dict[str, Any] | None:
    """The record student.init's directory holds (None before it is written)."""
    path = os.path.join(init.path, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def describe(record: dict[str, Any]) -> str:
    """One line for the report: what the student kept of its teacher."""
    widths = "".join(f", {k} {v}" for k, v in record["widths"].items())
    return (f"student started from {record['teacher']}: {len(record['layers'])} of {record['teacher_layers']} blocks "
            f"(kept {','.join(map(str, record['layers']))}){widths}; {record['params']:,} parameters, "
            f"{record['params'] / record['teacher_params']:.2f}x the teacher's")


def log_init(record: dict[str, Any] | None) -> None:
    """What was kept, in the active MLflow run: params init.* and the record as init/record.json."""
    if record is None:
        return
    import mlflow

    mlflow.log_params({"init.kept_layers": ",".join(map(str, record["layers"])), "init.params": record["params"],
                       "init.teacher_params": record["teacher_params"],
                       **{f"init.kept_{k}": v for k, v in record["widths"].items()}})
    tracking.log_json(record, "init/record.json")
