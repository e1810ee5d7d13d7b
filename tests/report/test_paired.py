"""featx.report.paired and the report's statistics: intervals, ≈ best, the verdict, old and
tampered results; and the per-image outputs fit-heads writes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from featx.artifacts import file_sha256, sha256_key
from featx.config import HeadsConfig, ReportConfig
from featx.heads import fit_heads
from featx.report import write_report
from featx.results import (
    image_outputs_path,
    make_result,
    read_image_outputs,
    read_result,
    write_image_outputs,
    write_json,
)
from featx.stats import scored_metrics
from tests.builders import blob_splits, dataset_record, invoke_cli, split_files, write_cache

CLASSES = ["normal", "pneumonia"]
# dataset_record's test split: 60 images, 30 per class, in split_files' order
TEST = split_files(CLASSES, 60, "te", 0)


def _test_list(ds):
    return [p for p, _ in TEST]


def _outputs(flip: int, *, seed=0, noise=1.0):
    """Labels, predictions and probabilities of the 60 test images; the first ``flip`` images
    of each class are predicted wrong."""
    rng = np.random.default_rng(seed)
    y = np.array([lab for _, lab in TEST])
    margin = np.where(y == 1, 1.0, -1.0) * (1.5 + noise * rng.random(len(y)))
    for c in (0, 1):
        margin[np.flatnonzero(y == c)[:flip]] *= -1
    p1 = 1 / (1 + np.exp(-margin))
    prob = np.column_stack([1 - p1, p1])
    return y, prob.argmax(1), prob


def _write(root, ds, name, kind, outputs, *, wall=10.0, with_outputs=True):
    """A result with real metrics (and its outputs file) as heads or fine-tuning write it."""
    y, pred, prob = outputs
    metrics = scored_metrics(y, pred, prob, CLASSES, probabilities=True, n_boot=200)
    folder = root / name
    json_path = folder / ("result.json" if kind == "finetune" else "pool1__logistic.json")
    artifacts = {}
    if with_outputs:
        out = write_image_outputs(image_outputs_path(json_path), _test_list(ds), y, pred, prob,
                                  CLASSES)
        artifacts = {"test_outputs": out.name, sha256_key("test_outputs"): file_sha256(out)}
    method = "finetune freeze=none loss=ce pool=1" if kind == "finetune" else f"{name} @ pool1"
    res = make_result(kind=kind, method=method, dataset=ds, model="resnet50", metrics=metrics,
                      timings={"total_s": wall}, feature="pool1", head="logistic",
                      artifacts=artifacts)
    return write_json(json_path, res)


@pytest.fixture
def ds():
    return dataset_record("xray", CLASSES)


def test_identical_predictions_are_both_best_with_delta_0_and_p_1(tmp_path, ds):
    same = _outputs(10)
    _write(tmp_path, ds, "a", "head", same)
    _write(tmp_path, ds, "b", "head", same)
    _write(tmp_path, ds, "c", "head", _outputs(25, seed=1))
    written = write_report(tmp_path, tmp_path / "rep")
    csv = pd.read_csv(written["csv"]).set_index("method")
    for m in ("a @ pool1", "b @ pool1"):
        assert csv.loc[m, "delta"] == 0 and csv.loc[m, "p"] == 1 and csv.loc[m, "p_holm"] == 1
        assert bool(csv.loc[m, "approx_best"])
    worse = csv.loc["c @ pool1"]
    assert worse["delta"] < 0 and worse["delta_hi"] < 0 and not bool(worse["approx_best"])
    assert worse["p_holm"] >= worse["p"]  # Holm never lowers a p-value
    assert worse["mcnemar_p"] < 0.05 and worse["delong_p"] < 0.05
    # the interval cells come from the shared column table
    row = csv.loc["a @ pool1"]
    assert row["test_accuracy_lo"] <= row["test_accuracy"] <= row["test_accuracy_hi"]
    md = written["markdown"].read_text()
    assert "≈ best" in md and "forest.png" in md and "reliability_head.png" in md
    assert f"{row['test_accuracy']:.3f} [{row['test_accuracy_lo']:.3f}, " in md


def test_report_opens_with_the_verdict_of_finetuning_against_the_best_head(tmp_path, ds):
    _write(tmp_path, ds, "logistic", "head", _outputs(12), wall=5.0)
    _write(tmp_path, ds, "ft", "finetune", _outputs(11, seed=3), wall=200.0)
    written = write_report(tmp_path, tmp_path / "rep")
    verdict = written["verdict"]
    assert verdict.startswith("fine-tuning resnet50 (freeze=none loss=ce pool=1) vs the best "
                              "frozen head (logistic @ pool1 on resnet50): Δ balanced accuracy ")
    assert "not shown to be better, at 40× the cost." in verdict
    md = written["markdown"].read_text().splitlines()
    assert md[2] == f"**{verdict}**"  # right under the title
    assert (tmp_path / "rep" / "reliability_finetune.png").is_file()

    # a clearly better fine-tuning is called better
    _write(tmp_path, ds, "ft", "finetune", _outputs(0, seed=3), wall=200.0)
    assert "— better, at 40× the cost." in write_report(tmp_path, tmp_path / "rep")["verdict"]


def test_old_result_without_outputs_is_ranked_and_named_once(tmp_path, ds):
    _write(tmp_path, ds, "new", "head", _outputs(10))
    _write(tmp_path, ds, "old1", "head", _outputs(5, seed=2), with_outputs=False)
    _write(tmp_path, ds, "old2", "head", _outputs(30, seed=2), with_outputs=False)
    written = write_report(tmp_path, tmp_path / "rep")
    csv = pd.read_csv(written["csv"])
    assert list(csv["method"]) == ["old1 @ pool1", "new @ pool1", "old2 @ pool1"]  # ranked
    notes = [n for n in written["note"] if "no usable per-image test outputs" in n]
    assert len(notes) == 1 and "2 result(s)" in notes[0] and "featx fit-heads" in notes[0]
    old = csv.set_index("method").loc["old2 @ pool1"]
    assert np.isnan(old["p"]) and np.isnan(old["delta"])


def test_tampered_outputs_give_one_line_and_no_traceback(tmp_path, ds):
    _write(tmp_path, ds, "a", "head", _outputs(10))
    path = _write(tmp_path, ds, "b", "head", _outputs(20))
    outputs = image_outputs_path(path)
    text = outputs.read_text().splitlines()
    text[1] = text[1].replace("normal", "pneumonia", 1)  # one label changed
    outputs.write_text("\n".join(text) + "\n")
    proc = invoke_cli("report", str(tmp_path))
    assert proc.exit_code == 0, proc.output
    assert "Traceback" not in proc.output
    lines = [ln for ln in proc.output.splitlines() if outputs.name in ln and "sha256" in ln]
    assert len(lines) == 1 and "Refused" in lines[0]
    assert "b @ pool1" in proc.output  # still ranked


def test_outputs_that_are_not_the_results_are_refused_in_one_line(tmp_path, ds):
    path = _write(tmp_path, ds, "a", "head", _outputs(10))
    res = read_result(path)
    out = image_outputs_path(path)
    assert read_image_outputs(out, res)["y_true"].shape == (60,)
    short = {**res, "metrics": {**res["metrics"], "n": 59}}
    with pytest.raises(ValueError, match="60 rows, but its result scored 59"):
        read_image_outputs(out, short)
    other = {**res, "dataset": {**res["dataset"], "classes": ["a", "b"]}}
    with pytest.raises(ValueError, match="columns path,label,pred,score_normal") as exc:
        read_image_outputs(out, other)
    assert "\n" not in str(exc.value)


def test_report_bootstrap_0_keeps_the_stored_intervals_and_runs_no_tests(tmp_path, ds):
    path = _write(tmp_path, ds, "a", "head", _outputs(10))
    stored = read_result(path)["metrics"]["intervals"]["accuracy"]
    csv = pd.read_csv(write_report(tmp_path, tmp_path / "rep",
                                   config=ReportConfig(bootstrap=0))["csv"])
    assert [csv["test_accuracy_lo"][0], csv["test_accuracy_hi"][0]] == pytest.approx(stored)
    assert np.isnan(csv["p"][0])
    with pytest.raises(ValueError, match="bootstrap=-1: must be 0 or more"):
        write_report(tmp_path, config=ReportConfig(bootstrap=-1))


def test_fit_heads_results_carry_intervals_and_outputs_keyed_by_the_test_list(tmp_path):
    from featx.cache import Cache
    cache = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(n=(20, 8, 30), sep=0.8))
    run = fit_heads([cache], HeadsConfig(heads=("linear", "logistic"), out_dir=tmp_path / "r",
                                         jobs=1, bootstrap=300))
    c = Cache(cache)
    for res, path in zip(run.results, run.json_paths):
        m = res["metrics"]
        assert m["intervals"]["bootstrap"] == {"method": "percentile", "level": 0.95,
                                               "n_boot": 300, "seed": 0, "stratified": True,
                                               "unit": "test image"}
        lo, hi = m["intervals"]["balanced_accuracy"]
        assert lo <= m["balanced_accuracy"] <= hi
        out = read_image_outputs(image_outputs_path(path), res)
        assert out["paths"] == c.paths("test")
        assert np.array_equal(out["y_true"], c.labels("test"))
        assert res["artifacts"]["test_outputs_sha256"] == file_sha256(image_outputs_path(path))
        # ridge has no predict_proba: no calibration numbers, said in the metrics
        probabilities = res["head"] == "logistic"
        assert (m["ece"] is not None) == probabilities
        assert m["score_kind"] == ("probability" if probabilities else "decision")
    # a result whose outputs file is gone is not current: a re-run fits it again, adding it
    image_outputs_path(run.json_paths[0]).unlink()
    again = fit_heads([cache], HeadsConfig(heads=("linear", "logistic"),
                                           out_dir=tmp_path / "r", jobs=1, bootstrap=300))
    assert any("1 of 2 result(s) are current" in n for n in again.notes)
    assert image_outputs_path(run.json_paths[0]).is_file()
    assert json.loads(run.json_paths[0].read_text())["artifacts"]["test_outputs"]
