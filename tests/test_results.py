"""The result record survives JSON, result paths are built in one place, and one table of
metric columns drives every table featx writes or prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featx.config import HeadsConfig
from featx.heads import fit_heads, format_summary
from featx.heads.task import SUMMARY_COLUMNS
from featx.metrics import classification_metrics
from featx.report import REPORT_COLUMNS
from featx.results import (
    METRIC_COLUMNS,
    RESULT_SCHEMA,
    finetune_result_path,
    head_model_path,
    head_result_path,
    make_result,
    read_result,
    write_json,
)
from tests.builders import blob_splits, write_cache

CLASSES = ["normal", "pneumonia", "covid", "other"]
REPO = Path(__file__).resolve().parents[1]


def _metrics(seed=5, n=200, k=4):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.5
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return classification_metrics(y, proba.argmax(1), proba, CLASSES)


def test_result_round_trips_through_json_with_nan_as_null(tmp_path):
    metrics = _metrics()
    metrics["val_accuracy"] = float("nan")
    dataset = {"name": "xray", "classes": CLASSES, "split_fingerprint": "a" * 64,
               "test_fingerprint": "b" * 64}
    for kind in ("head", "finetune"):
        result = make_result(kind=kind, method="m", dataset=dataset, model="resnet18",
                             metrics=metrics, timings={"fit_s": np.float32(1.5)},
                             settings={"C": np.float64(0.1)}, feature="pool2", head="svm")
        path = write_json(tmp_path / f"{kind}.json", result)
        back = read_result(path)
        assert back["schema"] == RESULT_SCHEMA and back["kind"] == kind
        assert back["metrics"]["val_accuracy"] is None
        assert back["metrics"]["accuracy"] == metrics["accuracy"]
        assert back["timings"]["fit_s"] == 1.5 and back["settings"]["C"] == 0.1
        assert set(back) >= {"featx_version", "created", "method", "model", "feature", "head",
                             "dataset", "settings", "selection", "metrics", "timings",
                             "provenance", "artifacts"}
    assert not list(tmp_path.glob(".*tmp"))


def test_make_result_requires_the_fingerprints_and_read_result_refuses_other_json(tmp_path):
    with pytest.raises(ValueError, match="test_fingerprint"):
        make_result(kind="head", method="m", model="x", metrics={}, timings={},
                    dataset={"name": "d", "classes": [], "split_fingerprint": "s"})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something/2"}))
    with pytest.raises(ValueError, match="not a featx result"):
        read_result(other)


def test_result_paths_are_the_documented_layout(tmp_path):
    path = head_result_path(tmp_path, "tiles_resnet18", "pool2", "svm")
    assert path == tmp_path / "tiles_resnet18" / "heads" / "pool2__svm.json"
    assert head_model_path(path) == path.with_name("pool2__svm.skops")
    assert finetune_result_path(tmp_path / "run") == tmp_path / "run" / "result.json"
    # the same builder gives compare's glob pattern
    assert head_result_path("", "*", "*", "svm").as_posix() == "*/heads/*__svm.json"


def test_fit_heads_writes_where_head_result_path_says(tmp_path):
    cache = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(n=(20, 8, 12)))
    run = fit_heads([cache], HeadsConfig(heads=("linear",), out_dir=tmp_path / "r", jobs=1))
    expected = head_result_path(tmp_path / "r", "blobs_synthetic", "penultimate", "linear")
    assert run.json_paths == [expected]
    assert read_result(expected)["artifacts"]["model"] == head_model_path(expected).name
    assert head_model_path(expected).is_file()


# --- the metric columns ----------------------------------------------------------------------

def test_columns_and_headers_are_the_ones_featx_has_always_written():
    """Pins the CSV columns and table headers (the outputs must not change)."""
    metric = ["test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_roc_auc",
              "test_ece", "test_brier"]
    assert [c.name for c in METRIC_COLUMNS] == metric
    # each metric with an interval brings its bounds, right after it (ECE has none)
    cells = [n for m in metric for n in ([m] if m == "test_ece" else [m, f"{m}_lo", f"{m}_hi"])]
    paired = ["delta", "delta_lo", "delta_hi", "p", "p_holm", "approx_best", "mcnemar_p",
              "mcnemar_p_holm", "delong_p", "delong_p_holm"]
    assert REPORT_COLUMNS == ["group", "comparable", "reason", "dataset", "rank", "best",
                              "model", "method", "kind", "feature", "head", *cells, *paired,
                              "n_test", "wall_s", "extract_share_s", "run_s",
                              "split_fingerprint", "test_fingerprint", "source",
                              # issue 20: repeats (featx.report.repeats), then label
                              # efficiency (featx.report.efficiency), appended
                              "split_seed", "seed", "repeat_group", "repeats_n",
                              "repeats_mean", "repeats_sd", "repeats_delta", "repeats_p",
                              "repeats_p_holm", "repeats_mark", "shots", "train_fraction",
                              "draw", "n_train", "per_class_labelled"]
    assert SUMMARY_COLUMNS == ["cache", "dataset", "model", "feature", "head", "mode",
                               "selection", "chosen", *cells, "val_score", "val_accuracy",
                               "val_balanced_accuracy", "select_s", "fit_s", "predict_s",
                               "extract_s", "total_s", "json"]
    row = {"dataset": "tiles", "model": "resnet18", "feature": "pool2", "head": "svm",
           "mode": "memory", "test_accuracy": 0.91234, "test_balanced_accuracy": 0.8,
           "test_macro_f1": 0.75, "test_roc_auc": None, "val_score": 0.5, "select_s": 1.0,
           "fit_s": 0.25}
    assert format_summary([row]).splitlines()[:2] == [
        "dataset        model          feature     head     mode    bal_acc    acc     f1"
        "    auc    ece  brier    val   fit_s",
        "tiles          resnet18       pool2       svm      memory    0.800  0.912  0.750"
        "      -      -      -  0.500    1.25"]


_EXTRA_METRIC = textwrap.dedent("""
    import sys
    import featx.metrics as metrics
    import featx.results as results

    # the two edits a new metric takes: compute it, add its column
    _plain = metrics.classification_metrics
    def with_error_rate(y_true, y_pred, y_score, classes):
        out = _plain(y_true, y_pred, y_score, classes)
        out["error_rate"] = 1.0 - out["accuracy"]
        return out
    metrics.classification_metrics = with_error_rate
    # (featx.stats computes no interval for it: interval=False, one CSV column)
    results.METRIC_COLUMNS += (results.Column("error_rate", "error", "err", interval=False),)

    from featx.cli import main
    cache, out = sys.argv[1:]
    # no intervals: the tables then show plain numbers, which this test reads by position
    for args in (["fit-heads", cache, "--heads", "linear,knn", "--features", "penultimate",
                  "--jobs", "1", "--out", out, "--bootstrap", "0"],
                 ["report", out, "--bootstrap", "0"]):
        try:
            main(args)
        except SystemExit as exc:
            if exc.code:
                raise
""")


def test_one_new_column_reaches_every_table_and_csv(tmp_path):
    cache = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(n=(20, 8, 12)))
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _EXTRA_METRIC, str(cache), str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()

    summary = pd.read_csv(out / "heads_summary.csv")
    i = SUMMARY_COLUMNS.index("test_brier_hi") + 1
    new = ["test_error_rate"]
    assert list(summary.columns) == SUMMARY_COLUMNS[:i] + new + SUMMARY_COLUMNS[i:]
    assert np.allclose(summary["test_error_rate"], 1 - summary["test_accuracy"])

    report = pd.read_csv(out / "report" / "report.csv")
    i = REPORT_COLUMNS.index("test_brier_hi") + 1
    assert list(report.columns) == REPORT_COLUMNS[:i] + new + REPORT_COLUMNS[i:]
    assert np.allclose(report["test_error_rate"], 1 - report["test_accuracy"])
    for json_name in summary["json"]:
        res = read_result(out / json_name)
        assert res["metrics"]["error_rate"] == pytest.approx(1 - res["metrics"]["accuracy"])

    # fit-heads terminal table: short header, 3 decimals
    head = next(ln for ln in lines if ln.startswith("dataset "))
    assert head.split()[5:] == ["bal_acc", "acc", "f1", "auc", "ece", "brier", "err", "val",
                                "fit_s"]
    knn = next(ln for ln in lines if ln.startswith("blobs ") and " knn " in ln).split()
    assert knn[11] == f"{1 - float(knn[6]):.3f}"

    # report terminal table and report.md: header after ROC-AUC, 4 decimals, right-aligned
    at = next(i for i, ln in enumerate(lines) if ln.startswith("rank "))
    assert lines[at].split() == ["rank", "model", "method", "kind", "test", "acc", "bal.", "acc",
                                 "macro", "F1", "ROC-AUC", "ECE", "Brier", "error", "p",
                                 "(Holm)", "wall", "s", "best"]
    acc_end = lines[at].index("test acc") + len("test acc")
    err_end = lines[at].index("error") + len("error")
    for row in lines[at + 1:at + 3]:
        assert row[err_end - 6:err_end] == f"{1 - float(row[acc_end - 6:acc_end]):.4f}"
    # report.html: a column of its own, from the same list
    page = (out / "report" / "report.html").read_text()
    assert '<th data-col="test_error_rate" title="test_error_rate">error</th>' in page
    md = (out / "report" / "report.md").read_text().splitlines()
    at = next(i for i, ln in enumerate(md) if ln.startswith("| rank |"))
    header = [c.strip() for c in md[at].strip("|").split("|")]
    assert header == ["rank", "model", "method", "kind", "test acc", "bal. acc", "macro F1",
                      "ROC-AUC", "ECE", "Brier", "error", "p (Holm)", "wall s", "best"]
    assert md[at + 1].strip("|").split("|") == ["---:"] + ["---"] * 3 + ["---:"] * 9 + ["---"]
    cells = [c.strip() for c in md[at + 2].strip("|").split("|")]
    assert cells[10] == f"{1 - float(cells[4]):.4f}"
