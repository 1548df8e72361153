"""Every bad input a user can give, through the CLI as they give it: exit code 2, one line on stderr
that names the key or file, and nothing written or lost (the store's files and manifest, the
teachers' checkpoints and the previous student are byte for byte what they were).

Each case works on its own copy of a `world`: the digits data, a complete store labelled by two
teachers, their checkpoints and a student, with a config whose teachers have no fit block (so
nothing is refitted unless the case asks). docs/errors.md has the same table for users.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from ensemblekd.testing import build_module, save_state, tiny_config, write_config


pytestmark = pytest.mark.integration
TESTS = Path(__file__).resolve().parents[1]
KEPT = ("store", "teachers", "out/student.pt")  # what must come out of a failed command as it went in


@pytest.fixture(scope="module")
def world(labelled, digits_dir, tmp_path_factory) -> Path:
    """A labelled store, its data, the teachers' checkpoints and a student, all under one folder,
    and world.yaml pointing at them (the store's recorded input paths are the fixture's: a moved
    file with the same content is still the labelled input)."""
    cfg, _ = labelled
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(digits_dir, root / "data")
    shutil.copytree(cfg.store.uri, root / "store")
    (root / "teachers").mkdir()
    raw = tiny_config(root, root / "data")
    for t, original in zip(raw["teachers"], cfg.teachers):
        shutil.copy(original.checkpoint, t["checkpoint"])
        t["fit"] = None
    (root / "out").mkdir()
    save_state(build_module(cfg.student.model, cfg.student.kwargs), str(root / "out" / "student.pt"))
    write_config(root, raw, "world.yaml")
    return root


def copy_world(world: Path, to: Path) -> tuple[Path, dict]:
    shutil.copytree(world, to)
    text = (world / "world.yaml").read_text().replace(str(world), str(to))
    return to, yaml.safe_load(text)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file of the store and the teachers, and of the student; the manifest compared
    without its save time (Ray Train's own run folder under the output dir is not ours to keep)."""
    out = {}
    for part in KEPT:
        for path in [root / part] if (root / part).is_file() else sorted((root / part).rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                if path.name == "manifest.json":
                    manifest = json.loads(data)
                    if isinstance(manifest, dict):
                        manifest.pop("updated", None)
                    data = json.dumps(manifest, sort_keys=True).encode()
                out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def cli(*args, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ensemblekd", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- changes a case makes to its world ---------------------------------------------------------------
def rewrite_shard(root: Path, split: str, index: int, change: Callable[[pa.Table], pa.Table]) -> None:
    path = root / "data" / split / f"part-{index:05d}.parquet"
    pq.write_table(change(pq.read_table(path)), path)


def new_features(table: pa.Table) -> pa.Table:
    """Same ids, same labels, other features: the store's targets no longer belong to these rows."""
    x = np.random.default_rng(0).random((table.num_rows, 64), dtype=np.float32)
    return table.set_column(table.column_names.index("x"), "x", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64))


def label_of_first_row(value: int):
    def change(table: pa.Table) -> pa.Table:
        y = table["y"].to_numpy().copy()
        y[0] = value
        return table.set_column(table.column_names.index("y"), "y", pa.array(y))
    return change


def nan_feature(table: pa.Table) -> pa.Table:
    x = np.stack(table["x"].to_numpy(zero_copy_only=False)).astype(np.float32)
    x[3, 5] = np.nan
    return table.set_column(table.column_names.index("x"), "x", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64))


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[200] ^= 0xFF
    path.write_bytes(bytes(raw))


def nine_class_teacher(root: Path, raw: dict) -> None:
    nine = {"name": "nine", "model": "ensemblekd.models:mlp", "checkpoint": str(root / "teachers" / "nine.pt"),
            "kwargs": {"in_features": 64, "num_classes": 9, "hidden": [16]}}
    save_state(build_module(nine["model"], nine["kwargs"]), nine["checkpoint"])
    raw["teachers"].append(nine)


def with_fit(raw: dict, **kwargs) -> None:
    raw["teachers"][0].update(fit={"epochs": 1}, **kwargs)


def manifest(content) -> Callable[[Path, dict], None]:
    def change(root: Path, raw: dict) -> None:
        (root / "store" / "manifest.json").write_text(json.dumps(content) if not isinstance(content, str) else content)
    return change


def manifest_edit(edit: Callable[[dict], None]) -> Callable[[Path, dict], None]:
    def change(root: Path, raw: dict) -> None:
        path = root / "store" / "manifest.json"
        m = json.loads(path.read_text())
        edit(m)
        path.write_text(json.dumps(m))
    return change


@dataclass
class Case:
    id: str
    argv: list[str]                                  # CONFIG: the case's config; STORE: its store
    fragments: list[str]                             # each in the one line
    change: Callable[[Path, dict], None] = lambda root, raw: None
    absent: list[str] = field(default_factory=list)  # never in the line


CASES = [
    # silently wrong before: now refused before any work
    Case("changed inputs, same ids", ["distill", "CONFIG"],
         ["data.train:", "part-00000.parquet changed since it was labelled", "ensemblekd label"],
         lambda root, raw: rewrite_shard(root, "train", 0, new_features)),
    Case("label column missing (distill)", ["distill", "CONFIG", "--set", "data.label=target"],
         ["no column 'target'", "set data.label", "data.label: null"]),
    Case("label column missing (label)", ["label", "CONFIG", "--set", "data.label=target"],
         ["no column 'target'", "set data.label"]),
    # one line where a traceback was
    Case("label out of range (distill)", ["distill", "CONFIG"],
         ["part-00001.parquet: labels in 'y' reach 12", "10 classes"],
         lambda root, raw: rewrite_shard(root, "train", 1, label_of_first_row(12))),
    Case("label out of range (fit)", ["label", "CONFIG"],
         ["data.train: labels reach 12", "teacher 'mlp_a' outputs 10 classes"],
         lambda root, raw: (rewrite_shard(root, "train", 1, label_of_first_row(12)), with_fit(raw))),
    Case("negative label", ["distill", "CONFIG"], ["part-00001.parquet", "negative labels (-3)"],
         lambda root, raw: rewrite_shard(root, "train", 1, label_of_first_row(-3))),
    Case("a CSV file as data", ["distill", "CONFIG", "--set", "data.val=VAL_CSV"],
         ["val.csv: not a Parquet file", "to_parquet"],
         lambda root, raw: (root / "val.csv").write_text("id,x,y\n0,1.0,3\n")),
    Case("a .parquet file that is not one", ["label", "CONFIG"], ["part-00002.parquet: not a Parquet file"],
         lambda root, raw: (root / "data" / "train" / "part-00002.parquet").write_text("id,x,y\n0,1.0,3\n")),
    Case("feature width at fit", ["label", "CONFIG"],
         ["teacher 'mlp_a': fails on the data", "mat1 and mat2", "data.features"],
         lambda root, raw: with_fit(raw, kwargs={"in_features": 32, "num_classes": 10, "hidden": [16]})),
    Case("NaN in the features", ["label", "CONFIG"],
         ["part-00000.parquet: feature column 'x' has NaN or Inf in 1 row(s)", "row 3"],
         lambda root, raw: rewrite_shard(root, "train", 0, nan_feature), absent=["teacher"]),
    Case("teacher with another class count", ["label", "CONFIG"],
         ["teacher 'nine' outputs 9 classes", "(mlp_a, mlp_b) 10", "fix or remove 'nine'"],
         lambda root, raw: nine_class_teacher(root, raw)),
    # the store's manifest
    Case("manifest []", ["inspect", "STORE"], ["manifest.json: not a store manifest", "a JSON list"], manifest([])),
    Case("manifest null", ["distill", "CONFIG"], ["manifest.json: not a store manifest"], manifest(None)),
    Case("manifest without shards", ["distill", "CONFIG"], ["manifest.json: not a store manifest", "shards"],
         manifest_edit(lambda m: m.pop("shards"))),
    Case("manifest version as text", ["inspect", "STORE"], ["not a store manifest", "schema_version"],
         manifest_edit(lambda m: m.update(schema_version="1")), absent=["reads 1"]),
    Case("manifest shard entry without checksum", ["distill", "CONFIG"], ["not a store manifest", "sha256"],
         manifest_edit(lambda m: m["shards"]["train"]["mlp_a"]["0"].pop("sha256"))),
    # a data error only a worker can see ends the run at once, not after retries (-1: unlimited)
    Case("corrupt shard, unlimited retries", ["distill", "CONFIG", "--set", "trainer.max_failures=-1",
                                                "--set", "trainer.num_workers=2"],
         ["train/mlp_a/part-00002.parquet: checksum mismatch", "--repair"],
         lambda root, raw: flip_a_byte(root / "store" / "train" / "mlp_a" / "part-00002.parquet")),
    # the config, checked in full before anything starts (run makes no MLflow run)
    Case("run with a bad model path", ["run", "CONFIG", "--set", "teachers.0.model=nowhere:mlp"],
         ["config.yaml: teachers.0.model: cannot import module 'nowhere'"]),
    Case("run with a missing checkpoint", ["run", "CONFIG", "--set", "teachers.1.checkpoint=/no/such.pt"],
         ["config.yaml: teachers.1.checkpoint: '/no/such.pt' does not exist"]),
    Case("a yes/no for a number", ["distill", "CONFIG", "--set", "trainer.epochs=true"],
         ["trainer.epochs: expected a number, not a yes/no value"]),
    # command-line numbers
    Case("evaluate --repeats -5", ["evaluate", "CONFIG", "--repeats", "-5"], ["--repeats: must be 0 or more, got -5"]),
    Case("evaluate --warmup x", ["evaluate", "CONFIG", "--warmup", "x"], ["--warmup: expected a whole number"]),
    Case("prepare --shard-rows 0", ["prepare", "digits", "OUT", "--shard-rows", "0"], ["--shard-rows: must be 1 or more"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, tmp_path, case):
    root, raw = copy_world(world, tmp_path / "w")
    case.change(root, raw)
    config = write_config(root, raw)
    before = snapshot(root)
    subs = {"CONFIG": config, "STORE": root / "store", "OUT": root / "prepared", "VAL_CSV": root / "val.csv"}
    argv = [*case.argv, *(["--no-progress"] if "CONFIG" in case.argv else [])]  # bars go to stderr too
    for key, value in subs.items():
        argv = [a.replace(key, str(value)) for a in argv]

    line = assert_one_line(cli(*argv, cwd=root), *case.fragments)

    for word in case.absent:
        assert word not in line
    assert snapshot(root) == before
    if case.argv[0] == "run":
        assert not (root / "mlflow.db").exists(), "run made an MLflow run before its config was checked"


# -- what a table row cannot hold ---------------------------------------------------------------------
UNSHARE = shutil.which("unshare")


def in_own_mounts(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """A shell script run as root of its own user and mount namespace (unshare -rm), so it can mount
    a small tmpfs or a read-only bind without touching the machine's mounts; they vanish with it."""
    env = {**os.environ, "PYTHONPATH": str(TESTS), "PY": sys.executable}
    return subprocess.run([UNSHARE, "-rm", "sh", "-ec", script], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=env)


needs_unshare = pytest.mark.skipif(
    UNSHARE is None or subprocess.run([UNSHARE or "true", "-rm", "true"], capture_output=True).returncode != 0,
    reason="needs unshare -rm (user and mount namespaces) to make a read-only or full filesystem")


@needs_unshare
@pytest.mark.parametrize("mount,fragment", [
    ("mount --bind store store && mount -o remount,ro,bind store", "read-only file system"),
    ("cp -a store full && mount -t tmpfs -o size=512k tmpfs store && cp -a full/. store && "
     "(head -c 1048576 /dev/zero > store/filler 2>/dev/null || true)", "no space left on device"),
])
def test_read_only_or_full_store_is_one_line_and_loses_nothing(world, tmp_path, mount, fragment):
    root, raw = copy_world(world, tmp_path / "w")
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    del manifest["shards"]["test"]["mlp_b"]  # work for label to do
    (root / "store" / "manifest.json").write_text(json.dumps(manifest))
    config = write_config(root, raw)
    before = snapshot(root)
    proc = in_own_mounts(f"""{mount}
        rc=0; "$PY" -m ensemblekd label {config} --no-progress 2> err.txt || rc=$?
        rm -f store/filler; echo $rc > rc.txt
        "$PY" -c 'import json, sys; sys.path.insert(0, "{Path(__file__).parent}"); \\
            from test_bad_inputs import snapshot; from pathlib import Path; print(json.dumps(snapshot(Path("."))))' > after.json
        ls -a store > listing.txt""", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert (root / "rc.txt").read_text().strip() == "2", (root / "err.txt").read_text()
    lines = (root / "err.txt").read_text().strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0].lower() and "/store/" in lines[0], lines
    assert json.loads((root / "after.json").read_text()) == before  # inside the namespace, before it vanished
    assert ".tmp-" not in (root / "listing.txt").read_text()


def test_temporaries_a_killed_write_left_are_removed_by_the_next_label(world, tmp_path):
    root, raw = copy_world(world, tmp_path / "w")
    left = [root / "store" / "train" / "mlp_a" / "part-00001.parquet.tmp-0badc0de", root / "store" / "manifest.json.tmp-1234abcd"]
    for path in left:
        path.write_bytes(b"half a write")
    before = snapshot(root)
    proc = cli("label", write_config(root, raw), "--no-progress", cwd=root)
    assert proc.returncode == 0 and "labelled 0 shard(s)" in proc.stdout, proc.stderr
    assert not any(p.exists() for p in left)
    assert snapshot(root).keys() == before.keys() - {str(p.relative_to(root)) for p in left}


def test_an_empty_parquet_file_is_skipped_with_a_note(world, tmp_path):
    root, raw = copy_world(world, tmp_path / "w")
    empty = root / "data" / "train" / "part-99999.parquet"
    pq.write_table(pq.read_table(root / "data" / "train" / "part-00000.parquet").slice(0, 0), empty)
    shards = json.loads((root / "store" / "manifest.json").read_text())["shards"]
    proc = cli("label", write_config(root, raw), "--no-progress", cwd=root)
    assert proc.returncode == 0 and "labelled 0 shard(s)" in proc.stdout, proc.stderr
    assert proc.stderr.strip() == f"label: skipping {empty}: it holds no rows (delete it to silence this note)"
    assert json.loads((root / "store" / "manifest.json").read_text())["shards"] == shards  # nothing relabelled


def test_a_model_module_in_the_working_directory_says_pythonpath(world, tmp_path):
    root, raw = copy_world(world, tmp_path / "w")
    (root / "my_models.py").write_text("from ensemblekd.models import mlp\n")
    raw["student"]["model"] = "my_models:mlp"
    script = Path(sys.executable).parent / "ensemblekd"  # the console script: no working directory on sys.path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([script, "validate", write_config(root, raw)], cwd=root, capture_output=True, text=True,
                          env=env, timeout=120)
    assert_one_line(proc, "student.model: module 'my_models' is in the working directory", "PYTHONPATH=.")
    ok = subprocess.run([script, "validate", root / "config.yaml"], cwd=root, capture_output=True, text=True,
                        env={**env, "PYTHONPATH": "."}, timeout=120)
    assert ok.returncode == 0, ok.stderr


def test_a_teacher_no_longer_configured_never_blocks_the_store(world, tmp_path, ray_local):
    """A store labelled by a 9-class teacher, then configured with 10-class ones only: the old teacher
    is forgotten (with a note), not a reason to delete the store by hand."""
    import ensemblekd as ekd

    root, raw = copy_world(world, tmp_path / "w")
    raw["store"]["uri"] = str(root / "store9")
    only_nine = {**raw, "teachers": []}
    nine_class_teacher(root, only_nine)
    ekd.label(ekd.load_config(write_config(root, only_nine, "nine.yaml")), progress=False)
    assert ekd.open_store(str(root / "store9")).manifest["num_classes"] == 9

    result = ekd.label(ekd.load_config(write_config(root, raw)), progress=False)

    store = ekd.open_store(str(root / "store9"))
    assert result.shards > 0 and store.teachers == ["mlp_a", "mlp_b"] and store.num_classes == 10
    assert all(ok for *_, ok, _ in store.verify())
