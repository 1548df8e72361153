"""What tests and benchmarks build on beside `import ensemblekd as ekd`: tiny data, a tiny config,
a labelled store, the one table renderer, and the machine and repeats a figure was measured on.

    from ensemblekd import testing
    data = testing.tiny_data(tmp / "digits")
    cfg, labelled = testing.labelled_store(tmp, data)          # two fitted teachers, every split labelled
    print(testing.markdown_table(["model", "acc"], [["student", "96.1%"]]))

The suite's fixtures (tests/conftest.py) and the benchmarks (tools/bench_*.py) use this module and
the public API, not the package's internals; docs/testing.md describes it. Nothing in the package
imports it (it sits at the top of the layers, beside the CLI).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ensemblekd import api
from ensemblekd.config import Config
from ensemblekd.data.builtin import prepare
from ensemblekd.data.inputs import read_split
from ensemblekd.models import build_module, load_state, load_student, mlp, save_state
from ensemblekd.stages.label import LabelResult
from ensemblekd.tables import human_bytes, markdown_table, text_table


# -- tiny data, a tiny config, a labelled store ------------------------------------------------------
def tiny_data(out: str | os.PathLike, name: str = "digits", shard_rows: int = 128) -> Path:
    """A built-in data set (`data.prepare` names: digits, wine, markov, ...) as train/val/test Parquet
    under `out`, `shard_rows` rows a shard; returns `out`."""
    prepare(name, str(out), shard_rows=shard_rows)
    return Path(out)


def tiny_config(tmp_path: str | os.PathLike, data_dir: str | os.PathLike, **sections: Any) -> dict[str, Any]:
    """Two small MLP teachers fitted on digits-shaped data (64 features, 10 classes), a 32-unit
    student, the store, outputs and MLflow under tmp_path, 8 epochs. The worker loop runs in the
    caller's process (trainer.num_workers 0): a test of Ray Train itself asks for workers with
    trainer={"num_workers": 2}. Each keyword replaces (a value) or updates (a dict) that section."""
    tmp, data = Path(tmp_path), Path(data_dir)

    def teacher(name: str, hidden: list[int], seed: int) -> dict[str, Any]:
        return {"name": name, "model": "ensemblekd.models:mlp",
                "kwargs": {"in_features": 64, "num_classes": 10, "hidden": hidden},
                "fit": {"epochs": 15, "lr": 0.003, **({"seed": seed} if seed else {})}, "checkpoint": str(tmp / "teachers" / f"{name}.pt"),
                "num_cpus": 0.5}

    cfg: dict[str, Any] = {
        "data": {"train": str(data / "train"), "val": str(data / "val"), "test": str(data / "test")},
        "teachers": [teacher("mlp_a", [128], 0), teacher("mlp_b", [64, 64], 1)],
        "store": {"uri": str(tmp / "store")},
        "student": {"model": "ensemblekd.models:mlp", "kwargs": {"in_features": 64, "num_classes": 10, "hidden": [32]}},
        "distill": {"temperature": 4.0, "alpha": 0.5},
        "trainer": {"num_workers": 0, "cpus_per_worker": 0.5, "epochs": 8, "batch_size": 64, "lr": 0.005,
                    "output_dir": str(tmp / "out")},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tests"},
        "ray": {"num_cpus": 2},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write_config(tmp_path: str | os.PathLike, cfg: dict[str, Any], name: str = "config.yaml") -> Path:
    """A config mapping as YAML under tmp_path (what `ensemblekd CMD FILE` takes)."""
    path = Path(tmp_path) / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def labelled_store(tmp_path: str | os.PathLike, data_dir: str | os.PathLike, **sections: Any) -> tuple[Config, LabelResult]:
    """tiny_config's teachers fitted and labelled into its store (Ray must be running or startable):
    the config, checked, and what label did. Share it across a module or session: it is the
    expensive part of most tests."""
    cfg = api.load_config(write_config(tmp_path, tiny_config(tmp_path, data_dir, **sections)))
    return cfg, api.label(cfg, progress=False)


# -- measuring -------------------------------------------------------------------------------------
def machine(**versions: str) -> dict[str, Any]:
    """What a figure was measured on: CPU model, cores, memory, date, Python, the load average at
    the start, plus the given versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = 0.0
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "date": time.strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), **versions, "load_average_at_start": os.getloadavg()}


def median_spread(values: Sequence[float]) -> tuple[float, float]:
    """The median of repeats and their spread (max - min): how a benchmark reports a ratio or a time."""
    return statistics.median(values), max(values) - min(values)


def write_results(out: str | os.PathLike, stem: str, res: dict[str, Any], rows: list[dict[str, Any]], text: str) -> None:
    """OUT/<stem>.md (the text) and OUT/<stem>.json (settings, machine, every figure: res with its
    rows), OUT created if missing; prints the text."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res["rows"] = rows
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str))
    print(text)
    print(f"wrote {out / f'{stem}.md'}, {out / f'{stem}.json'}")


__all__ = ["build_module", "human_bytes", "labelled_store", "load_state", "load_student", "machine", "markdown_table", "median_spread", "mlp",
           "read_split", "save_state", "text_table", "tiny_config", "tiny_data", "write_config", "write_results"]
