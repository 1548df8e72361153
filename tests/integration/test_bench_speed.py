"""The speed benchmark's --quick smoke mode runs end to end (it asserts that it runs and what it
writes, not the speeds it measures: those mean nothing at --quick sizes, nor on a busy machine)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.integration

ROWS = {
    "label": ["label_vs_plain", "label_vs_raydata", "label_vs_plain_wall", "label_vs_raydata_wall",
              "per_teacher_vs_plain", "per_teacher_vs_raydata", "per_teacher_vs_plain_wall", "per_teacher_vs_raydata_wall",
              "label_startup_vs_plain", "label_startup_vs_raydata"],
    "distill": ["offline_vs_online_epoch", "end_to_end", "cached_vs_online_plain", "trainer_overhead", "kd_vs_hard",
                "plain_kd_vs_hard"],
    "store": ["reader_vs_pyarrow", "bytes_per_row"],
    "deepspeed": ["zero0_vs_ddp", "zero1_vs_ddp", "zero2_vs_ddp", "zero3_vs_ddp", "zero0_clip_vs_ddp"],
}


def test_bench_speed_quick(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_speed.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "speed.json").read_text())
    table = (out / "speed.md").read_text()
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == [key for keys in ROWS.values() for key in keys]
    assert "| stage | what is measured | ensemblekd | baseline | ratio | target | met |" in table
    for key, r in rows.items():
        assert r["what"] in table, key
        assert r["ensemblekd"] > 0 and r["baseline"] > 0 and r["ratio"] > 0, r
        assert (r["target"] is None) == (r["met"] is None), r
    assert sum(r["target"] is not None for r in rows.values()) == 11
    machine = result["machine"]
    for key in ("cpu", "cores", "date", "python", "torch", "ray", "deepspeed", "pyarrow"):
        assert machine[key], key
        assert str(machine[key]) in table, key
    assert result["settings"]["quick"] and result["ray_init_s"] > 0
    assert all(f > 0 for f in result["flops"]["teachers_mflop_per_row"].values())
    assert min(result["flops"]["teachers_mflop_per_row"].values()) >= 10 * result["flops"]["student_mflop_per_row"]
