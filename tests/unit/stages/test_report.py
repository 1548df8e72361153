"""The evaluation report without a run: the latency timer behind its cost columns
(stages.evaluate.measure_latency) and its tables on a synthetic report (stages.report)."""

import time

import numpy as np
import pytest

import torch

from ensemblekd.stages.evaluate import LATENCY_KEYS, measure_latency, summarise
from ensemblekd.stages.report import format_markdown, format_report
from ensemblekd.tasks import TASKS

CLASSIFICATION, TOKEN = TASKS["classification"], TASKS["token"]


def test_latency_warms_up_times_each_call_and_fills_the_batch():
    shapes = []

    def forward(xb):
        shapes.append(tuple(xb.shape))
        time.sleep(0.002)

    p50, p99 = measure_latency(forward, CLASSIFICATION.latency_batch(torch.zeros(10, 3), 64), warmup=3, repeats=20)
    assert len(shapes) == 23 and set(shapes) == {(64, 3)}
    assert 2.0 <= p50 <= p99 < 1000


def test_a_text_latency_batch_repeats_the_texts():
    assert TASKS["text"].latency_batch(["a", "b", "c"], 7) == ["a", "b", "c", "a", "b", "c", "a"]


def _synthetic_report() -> dict:
    """Rows as stages.evaluate.evaluate makes them, for two teachers, their ensemble and a student."""
    rows = [
        {"model": "mlp_a", "role": "teacher", "accuracy": 0.95, "fidelity": 0.97, "kl": 0.05, "ece": 0.02,
         "params": 9610, "bytes": 40_000},
        {"model": "mlp_b", "role": "teacher", "accuracy": 0.94, "fidelity": 0.96, "kl": 0.06, "ece": 0.03,
         "params": 8970, "bytes": 38_000},
        {"model": "ensemble", "role": "ensemble", "accuracy": 0.96, "fidelity": 1.0, "kl": 0.0, "ece": 0.02,
         "params": 18580, "bytes": 78_000},
        {"model": "student", "role": "student", "accuracy": 0.93, "fidelity": 0.95, "kl": 0.1, "ece": 0.04,
         "params": 2410, "bytes": 11_000},
    ]
    for i, r in enumerate(rows):
        r.update({key: 0.01 * (i + 1) * (j + 1) for j, key in enumerate(LATENCY_KEYS)})
    return _report(rows, CLASSIFICATION)


def _report(rows: list[dict], task) -> dict:
    summary, keeps = summarise(rows, task)
    return {"rows": rows, "summary": summary, "student_keeps": keeps, "columns": [list(c) for c in task.columns],
            "latency": {"threads": 1, "warmup": 20, "repeats": 7, "batches": [1, 64]}}


def test_tables_of_a_synthetic_report():
    """What the integration test checks of a real run's tables, on a report made here."""
    report = _synthetic_report()
    table = format_report(report)
    assert "p50 @64" in table and "student vs. ensemble:" in table and "7 runs after 20 warm-up" in table
    assert max(len(line) for line in table.splitlines()) <= 100
    md = format_markdown(report).splitlines()
    assert md[0].startswith("| model | role | test acc | fidelity | KL | ECE | params | size | p50 @1 (ms)")
    assert len([l for l in md if l.startswith("| ")]) == 2 + 4
    assert "1.1x smaller on disk" not in table and "3.00 points lower test accuracy" in table


def test_a_language_model_report_with_a_baseline_and_continuations():
    """Task token's rows carry NLL and perplexity: the table shows them (not ECE), the summary says how
    much of the perplexity gap between the student trained alone and the ensemble distilling closed."""
    report = _synthetic_report()
    ppl = {"mlp_a": 20.0, "mlp_b": 30.0, "ensemble": 18.0, "student": 40.0}
    for r in report["rows"]:
        r.update(nll=float(np.log(ppl[r["model"]])), perplexity=ppl[r["model"]], tokens_per_s=1000.0, ece=None)
    alone = {**report["rows"][-1], "model": "student_alone", "role": "baseline", "perplexity": 60.0,
             "nll": float(np.log(60.0))}
    report["rows"].append(alone)
    report = _report(report["rows"], TOKEN)
    assert report["summary"]["gap_closed"] == pytest.approx((60 - 40) / (60 - 18))      # 47.6%
    assert report["summary"]["perplexity_retained"] == pytest.approx(18 / 40)
    report["continuations"] = [{"prompt": "def f", "model": m, "text": "(x):\n  return x"} for m in ("mlp_a", "student")]
    table = format_report(report)
    assert "ppl" in table and "ECE" not in table and "tok/s" in table
    assert "closed 47.6% of the perplexity gap between the student trained alone and the ensemble" in table
    assert "keeps 45.0% of its perplexity" in table
    assert "greedy continuation of 'def f':" in table and '"(x):\\n  return x"' in table
    md = format_markdown(report)
    assert md.startswith("| model | role | ppl | NLL/tok | bits/B | bits/ch | top-1 | fidelity | KL | tok/s | params")
    assert "```" in md
