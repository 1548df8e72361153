"""Evaluation (accuracy, fidelity, KL, ECE, size, CPU latency; the bubble chart) and `compare`
over an MLflow experiment with two real runs (Ray Train + DeepSpeed, 2 epochs each). The pure parts
against hand-computed numbers are in tests/unit/metrics/test_metrics.py and tests/unit/stages/test_report.py."""

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import ensemblekd as ekd
from ensemblekd.metrics import expected_calibration_error

LATENCY_KEYS = ("p50_ms_b1", "p99_ms_b1", "p50_ms_b64", "p99_ms_b64")


# -- two real runs in one experiment ----------------------------------------------------------
@pytest.fixture(scope="module")
def two_runs(labelled, tmp_path_factory):
    """`kd` (T=4, alpha=0.5) and `alone` (T=2, alpha=1: hard labels only, the gap-closed baseline)."""
    import mlflow

    cfg, _ = labelled
    tmp = tmp_path_factory.mktemp("compare")
    shutil.copytree(cfg.store.uri, tmp / "store")
    runs = {}
    for name, temperature, alpha in (("kd", 4.0, 0.5), ("alone", 2.0, 1.0)):
        c = cfg.model_copy(deep=True)
        c.store.uri, c.trainer.output_dir, c.trainer.epochs = str(tmp / "store"), str(tmp / name), 2
        c.distill.temperature, c.distill.alpha = temperature, alpha
        c.tracking.uri, c.tracking.experiment, c.tracking.run_name = f"sqlite:///{tmp / 'mlflow.db'}", "cmp", name
        runs[name] = (c, ekd.run(c, progress=False))
    yield tmp, runs
    mlflow.set_tracking_uri(None)


def test_report_rows_are_complete_and_consistent(two_runs):
    from ensemblekd.testing import load_student, read_split

    _, runs = two_runs
    cfg, result = runs["kd"]
    report = result.evaluation.report
    rows = {r["model"]: r for r in report["rows"]}
    assert list(rows) == ["mlp_a", "mlp_b", "ensemble", "student"]
    for r in rows.values():
        assert {"accuracy", "fidelity", "kl", "ece", "params", "bytes", *LATENCY_KEYS} <= set(r)
        assert 0 < r["p50_ms_b1"] <= r["p99_ms_b1"] and 0 < r["p50_ms_b64"] <= r["p99_ms_b64"]
        assert 0 <= r["ece"] < 1 and r["kl"] >= 0 and r["bytes"] > 0
    ens, st = rows["ensemble"], rows["student"]
    assert ens["bytes"] == rows["mlp_a"]["bytes"] + rows["mlp_b"]["bytes"] and ens["kl"] == 0 and ens["fidelity"] == 1
    assert ens["params"] == rows["mlp_a"]["params"] + rows["mlp_b"]["params"]
    assert ens["p50_ms_b64"] > max(rows["mlp_a"]["p50_ms_b64"], rows["mlp_b"]["p50_ms_b64"])  # every teacher runs
    s = report["summary"]
    assert s["speedup_b1"] == pytest.approx(ens["p50_ms_b1"] / st["p50_ms_b1"])
    assert s["speedup_b64"] == pytest.approx(ens["p50_ms_b64"] / st["p50_ms_b64"])
    assert s["size_reduction"] == pytest.approx(ens["bytes"] / st["bytes"]) and s["size_reduction"] > 3
    assert s["accuracy_gap"] == pytest.approx(ens["accuracy"] - st["accuracy"])

    # fidelity, KL and ECE of the student recomputed here: uniform mix of the stored teacher logits
    ids, x, y = read_split(cfg.data.test, "x", "y", "id")
    store = ekd.open_store(cfg.store.uri)
    stored = [store.targets(n, "test") for n in ("mlp_a", "mlp_b")]
    assert all(np.array_equal(t.ids, ids) for t in stored)
    p_ens = np.mean([torch.softmax(torch.from_numpy(t.logits.astype(np.float32)), -1).numpy() for t in stored], axis=0)
    with torch.no_grad():
        z = load_student(cfg.student, result.student)(torch.from_numpy(x)).numpy()
    assert st["fidelity"] == pytest.approx((z.argmax(1) == p_ens.argmax(1)).mean())
    assert st["accuracy"] == pytest.approx((z.argmax(1) == y).mean())
    q = torch.softmax(torch.from_numpy(z), -1).numpy()
    assert st["kl"] == pytest.approx(np.mean(np.sum(p_ens * (np.log(p_ens) - np.log(q)), 1)), rel=1e-4)
    assert st["ece"] == pytest.approx(expected_calibration_error(q, y))

    table = result.table
    assert table == ekd.Evaluation.of(report).table and "p50 @64" in table and "student vs. ensemble:" in table
    assert max(len(line) for line in table.splitlines()) <= 100


def test_report_metrics_tags_and_artifacts_in_mlflow(two_runs):
    from matplotlib.image import imread
    from mlflow.tracking import MlflowClient

    tmp, runs = two_runs
    _, result = runs["kd"]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    m, summary = run.data.metrics, result.evaluation.report["summary"]
    assert m["speedup_b1"] == pytest.approx(summary["speedup_b1"]) and m["size_reduction"] == pytest.approx(summary["size_reduction"])
    for key in ("student_fidelity", "student_kl", "student_ece", "speedup_b64", "student_accuracy_gap",
                "latency_p50_ms_b1.student", "latency_p99_ms_b64.ensemble", "latency_p50_ms_b1.mlp_a"):
        assert key in m, key
    tags = run.data.tags
    assert (tags["ensemblekd.temperature"], tags["ensemblekd.alpha"], tags["ensemblekd.weighting"]) == ("4.0", "0.5", "uniform")
    assert {a.path for a in client.list_artifacts(result.run_id, "report")} == {
        f"report/{n}" for n in ("report.json", "table.md", "table.txt", "bubble.png")}
    png = client.download_artifacts(result.run_id, "report/bubble.png", str(tmp))
    height, width, _ = imread(png).shape
    assert width > 600 and height > 400
    assert (tmp / "kd" / "report" / "bubble.png").read_bytes() == Path(png).read_bytes()  # and beside the student
    md = (tmp / "kd" / "report" / "table.md").read_text().splitlines()
    assert md[0].startswith("| model | role | test acc") and len([l for l in md if l.startswith("| ")]) == 2 + 4
    assert json.loads((tmp / "kd" / "report" / "report.json").read_text())["summary"] == pytest.approx(summary)


def _compare(capsys, tmp, *args):
    from ensemblekd.cli import main

    code = main(["compare", "--experiment", "cmp", "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_compare_one_row_per_run_with_the_right_values(two_runs, capsys):
    tmp, runs = two_runs
    code, out, _ = _compare(capsys, tmp, "--format", "json")
    assert code == 0
    rows = {r["run_name"]: r for r in json.loads(out)}
    assert set(rows) == {"kd", "alone"}
    acc = {name: {r["model"]: r["accuracy"] for r in res.evaluation.report["rows"]} for name, (_, res) in runs.items()}
    kd, alone = rows["kd"], rows["alone"]
    assert (kd["strategy"], kd["weighting"], kd["teachers"]) == ("parallel", "uniform", "mlp_a,mlp_b")
    assert (kd["temperature"], kd["alpha"], alone["temperature"], alone["alpha"]) == (4.0, 0.5, 2.0, 1.0)
    assert kd["student_acc"] == pytest.approx(acc["kd"]["student"])
    assert kd["acc_gap"] == pytest.approx(acc["kd"]["ensemble"] - acc["kd"]["student"])
    expected_gap_closed = (acc["kd"]["student"] - acc["alone"]["student"]) / (acc["kd"]["ensemble"] - acc["alone"]["student"])
    assert kd["gap_closed"] == pytest.approx(expected_gap_closed) and alone["gap_closed"] is None
    kd_student = next(r for r in runs["kd"][1].evaluation.report["rows"] if r["role"] == "student")
    assert kd["bytes"] == kd_student["bytes"] and kd["p50_ms_b1"] == pytest.approx(kd_student["p50_ms_b1"])
    assert kd["fidelity"] == pytest.approx(kd_student["fidelity"]) and kd["run_id"] == runs["kd"][1].run_id


def test_compare_sorts_and_every_format_parses(two_runs, capsys):
    tmp, _ = two_runs
    _, out, _ = _compare(capsys, tmp, "--sort", "temperature", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["run_name"] for r in rows] == ["alone", "kd"] and float(rows[1]["alpha"]) == 0.5
    assert rows[0]["gap_closed"] == "" and float(rows[1]["student_acc"]) > 0.3
    _, out, _ = _compare(capsys, tmp, "--sort", "temperature", "--desc", "--format", "json")
    assert [r["temperature"] for r in json.loads(out)] == [4.0, 2.0]
    _, out, _ = _compare(capsys, tmp, "--sort", "student_acc", "--desc", "--format", "json")
    accs = [r["student_acc"] for r in json.loads(out)]
    assert accs == sorted(accs, reverse=True)
    _, out, _ = _compare(capsys, tmp, "--sort", "alpha")                     # markdown, the default
    lines = out.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| run_name | strategy |") and "gap_closed" in lines[0]
    assert lines[2].startswith("| kd | parallel | uniform | 4 | 0.5 | mlp_a,mlp_b |")
    assert lines[3].startswith("| alone |") and lines[3].count("| - |") == 1   # no gap closed for the baseline


@pytest.mark.parametrize("args,fragment", [
    (["--sort", "speed"], "--sort: unknown column 'speed'; choose one of run_name, run_id,"),
    (["--experiment", "nope"], "--experiment: no experiment 'nope' in sqlite:"),
])
def test_compare_bad_input_is_one_line(two_runs, capsys, args, fragment):
    tmp, _ = two_runs
    code, _, err = _compare(capsys, tmp, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err


def test_evaluate_command_logs_its_own_run(two_runs, capsys):
    from mlflow.tracking import MlflowClient

    from ensemblekd.cli import main

    tmp, runs = two_runs
    cfg, _ = runs["kd"]
    path = tmp / "kd.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    code = main(["evaluate", str(path), "--repeats", "7", "--set", "tracking.experiment=evaluate-cli"])
    out = capsys.readouterr().out
    assert code == 0 and "7 runs after 20 warm-up" in out and "student vs. ensemble:" in out
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("evaluate-cli").experiment_id])[0]
    assert run.data.tags["ensemblekd.stage"] == "evaluate" and "speedup_b64" in run.data.metrics
