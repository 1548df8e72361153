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
    assert "student runs (1 seeds, 3 epochs): estimated" in proc.stdout   # the estimate, printed at start
    table = (tmp_path / "quality.md").read_text()
    assert "| digits | low | mlp[32] (2,410 p) | ca_mkd |" in table
    assert "| specialists | full | mlp[32] (1,004 p) | alone |" in table
    assert "| digits | low | ca_mkd |" in table                          # the best-variant table
    assert "## Goals" in table and "(i) specialists, full labels: not run" in table
    saved = json.loads((tmp_path / "quality.json").read_text())
    results = saved["results"]
    assert len(results) == 2 and all(0.0 <= r["student"] <= 1.0 for r in results)
    assert {(r["dataset"], r["regime"], r["variant"]) for r in results} == {
        ("digits", "low", "ca_mkd"), ("specialists", "full", "alone")}
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    low = next(r for r in results if r["regime"] == "low")
    assert low["teachers"]["wide_mlp"] > 0.9            # teachers were fitted on full labels
    spec = next(r for r in results if r["dataset"] == "specialists")
    assert sorted(spec["teachers"]) == ["spec_0", "spec_1", "spec_2"]
    assert all(acc < 0.5 for acc in spec["teachers"].values())   # each a specialist: one group of three
    # the right specialist's weight per rule, from the stored train logits (full labels: every row labelled)
    weights = {w["rule"]: w for w in saved["right_weight"]}
    assert set(weights) == {"uniform", "uniform (logit mix)", "accuracy (γ=4)", "entropy", "ca_mkd"}
    assert weights["uniform"]["right_weight"] == pytest.approx(1 / 3)
    assert weights["ca_mkd"]["right_weight"] > weights["uniform"]["right_weight"]
    assert all(w["regime"] == "full" and w["rows"] > 2000 for w in weights.values())
    assert "| full | ca_mkd |" in table
    # --summarise-only rewrites the report from quality.json
    (tmp_path / "quality.md").unlink()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_quality.py"), "--summarise-only",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| specialists | full | mlp[32] (1,004 p) | alone |" in (tmp_path / "quality.md").read_text()
