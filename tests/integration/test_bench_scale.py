"""The scale benchmark's manifest part runs (no Ray: the real Store, a virtual clock); its figures
are not asserted, only that every design's row and the plot are written."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_scale_manifest_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_scale.py"), "--quick", "--only", "manifest",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [(r["design"], r["entries"]) for r in rows] == [
        ("whole each save", 10), ("commit log", 10), ("whole each save", 800), ("commit log", 800)]
    assert all(r["manifest_s"] > 0 and r["saves"] >= 2 for r in rows)
    assert 0 < rows[3]["reader_saw"] <= 800  # a reader mid-run sees the commits in the log
    assert "| commit log | 100 | 8 | 800 |" in (tmp_path / "scale.md").read_text()
    assert (tmp_path / "scale.png").stat().st_size > 10_000
