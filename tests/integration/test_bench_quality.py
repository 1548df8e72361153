"""The quality benchmark's --quick smoke mode runs end to end (it asserts that it runs and what it
writes, not the accuracies it measures)."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration


def test_bench_quality_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_quality.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "quality.md").read_text()
    for regime, variant in (("full", "alone"), ("low", "ca_mkd")):
        assert f"| digits | {regime} | mlp[32] (2,410 p) | {variant} |" in table
    results = json.loads((tmp_path / "quality.json").read_text())
    assert len(results) == 2 and all(0.0 <= r["student"] <= 1.0 for r in results)
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    low = next(r for r in results if r["regime"] == "low")
    assert low["teachers"]["wide_mlp"] > 0.9            # teachers were fitted on full labels
