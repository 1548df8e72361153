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
    assert "| specialists | low | mlp[32] (1,004 p) | ca_mkd |" in table
    assert "| specialists | low | ca_mkd |" in table                     # the best-variant table
    assert "## Goals" in table and "(i) specialists, low labels: not run" in table
    saved = json.loads((tmp_path / "quality.json").read_text())
    results = saved["results"]
    assert len(results) == 1 and all(0.0 <= r["student"] <= 1.0 for r in results)
    assert {(r["dataset"], r["regime"], r["variant"]) for r in results} == {("specialists", "low", "ca_mkd")}
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    spec = results[0]
    assert sorted(spec["teachers"]) == ["spec_0", "spec_1", "spec_2"]
    assert all(acc < 0.5 for acc in spec["teachers"].values())   # each a specialist: one group of three
    # the right specialist's weight per rule, from the stored train logits (low labels: 10% of the rows labelled)
    weights = {w["rule"]: w for w in saved["right_weight"]}
    assert set(weights) == {"uniform", "uniform (logit mix)", "accuracy (γ=4)", "entropy", "ca_mkd"}
    assert weights["uniform"]["right_weight"] == pytest.approx(1 / 3)
    assert weights["ca_mkd"]["right_weight"] > weights["uniform"]["right_weight"]
    assert weights["ca_mkd"]["right_weight_labelled"] == pytest.approx(0.5, abs=0.05)  # the label shows who is right
    assert all(w["regime"] == "low" and w["rows"] > 2000 for w in weights.values())
    assert "| low | ca_mkd |" in table
    # --summarise-only rewrites the report from quality.json
    (tmp_path / "quality.md").unlink()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench_quality.py"), "--summarise-only",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| specialists | low | mlp[32] (1,004 p) | ca_mkd |" in (tmp_path / "quality.md").read_text()
