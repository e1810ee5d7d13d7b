"""Contracts a mutation audit found unprotected (issue 24): each test here went red with the
named mutation applied and the rest of the suite green."""
from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.decomposition import IncrementalPCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline

from featx.apply import head_module
from featx.cache import Cache, StaleCacheError
from featx.cli import main
from featx.config import ExtractConfig
from featx.data import load_dataset
from featx.extract import extract
from featx.heads import build_head, class_scores
from featx.metrics import classification_metrics
from featx.report import load_results, rank_results
from featx.results import make_result, read_result, write_json
from tests.builders import blob_splits, write_cache


# -- a cache's recorded transform is part of its inputs -----------------------------------

@pytest.mark.parametrize("field,value", [("mean", [0.5, 0.5, 0.5]), ("std", [0.2, 0.2, 0.2]),
                                         ("resize", 40), ("interpolation", "nearest")])
def test_a_cache_made_with_another_transform_at_the_same_crop_is_stale(digits_dir, tmp_path,
                                                                       field, value):
    """Mutation: ``transform`` dropped from the provenance keys that decide reuse."""
    data = load_dataset(digits_dir)
    cfg = ExtractConfig("resnet18", weights="none", image_size=32, pools=(1,), workers=0,
                        device="cpu", precision="fp32", out_dir=str(tmp_path), progress=False)
    path = extract(data, cfg).path
    with h5py.File(path, "r+") as f:
        recorded = json.loads(f.attrs["transform"])
        assert recorded[field] != value
        recorded[field] = value  # what an older featx with another transform rule wrote
        f.attrs["transform"] = json.dumps(recorded)
    assert Cache(path).attrs["transform"]["crop"] == 32  # the same crop: only `field` differs
    with pytest.raises(StaleCacheError, match="transform.*--overwrite"):
        extract(data, cfg)


# -- ranking ------------------------------------------------------------------------------

_DATASET = {"name": "xray", "root": "/data/xray", "classes": ["NORMAL", "PNEUMONIA"],
            "fingerprint": "f" * 64, "split_fingerprint": "s" * 64, "test_fingerprint": "t" * 64,
            "counts": {"train": 80, "val": 20, "test": 100}}


def _result(root, name, y_true, y_pred, total_s):
    metrics = classification_metrics(y_true, y_pred, None, _DATASET["classes"])
    res = make_result(kind="head", method=f"{name} @ penultimate", dataset=_DATASET,
                      model="resnet18", metrics=metrics,
                      timings={"extract_s": 0.0, "fit_s": total_s, "total_s": total_s},
                      feature="penultimate", head=name, artifacts={})
    return write_json(root / "xray_resnet18" / "heads" / f"penultimate__{name}.json", res)


def _ranked_methods(root):
    return [r["method"] for r in rank_results(load_results(root)) if r.get("rank")]


def test_ranking_is_by_balanced_accuracy_where_plain_accuracy_disagrees(tmp_path):
    """Mutation: the ranking sorts by plain accuracy. On a 1:4 test set, always saying the
    majority class has the higher accuracy and the lower balanced accuracy."""
    y = np.array([0] * 20 + [1] * 80)
    majority = np.ones_like(y)  # accuracy 0.80, balanced accuracy 0.50
    balanced = y.copy()
    balanced[:4] = 1
    balanced[20:44] = 0  # accuracy 0.72, balanced accuracy 0.75
    _result(tmp_path, "majority", y, majority, 1.0)
    _result(tmp_path, "balanced", y, balanced, 1.0)
    ranked = rank_results(load_results(tmp_path))
    by = {r["head"]: r for r in ranked}
    assert by["majority"]["test_accuracy"] > by["balanced"]["test_accuracy"]
    assert by["majority"]["test_balanced_accuracy"] < by["balanced"]["test_balanced_accuracy"]
    assert _ranked_methods(tmp_path)[0] == "balanced @ penultimate"


def test_equal_scores_rank_the_shorter_wall_time_first(tmp_path):
    """Mutation: the wall-time tie-break dropped (or reversed). The slower result is written
    first and named first alphabetically, so neither file order nor name can hide it."""
    y = np.array([0] * 50 + [1] * 50)
    pred = y.copy()
    pred[:5] = 1
    pred[50:55] = 0
    _result(tmp_path, "aaa-slow", y, pred, 90.0)
    _result(tmp_path, "zzz-fast", y, pred, 3.0)
    assert _ranked_methods(tmp_path) == ["zzz-fast @ penultimate", "aaa-slow @ penultimate"]


# -- fit-heads: the summary CSV and the reuse of earlier results --------------------------

def _fit_heads(*args):
    return CliRunner().invoke(main, ["fit-heads", *map(str, args)])


def test_a_second_fit_heads_into_the_same_out_keeps_the_earlier_summary_rows(tmp_path):
    """Mutation: heads_summary.csv rewritten from this call's rows only."""
    cache = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(pools=()))
    out = tmp_path / "res"
    for head in ("logistic", "linear"):
        r = _fit_heads(cache, "--heads", head, "--features", "penultimate", "--out", out,
                       "--jobs", "1")
        assert r.exit_code == 0, r.output
    rows = pd.read_csv(out / "heads_summary.csv")
    assert sorted(rows["head"]) == ["linear", "logistic"]


@pytest.mark.parametrize("change", [["--class-weight", "balanced"], ["--no-standardize"],
                                    ["--cv", "3", "--select", "cv"]])
def test_a_fit_heads_rerun_with_other_settings_refits(tmp_path, change):
    """Mutation: a result counted as current whatever the request (class weight, scaling,
    selection). The re-run must fit again and record the new settings."""
    cache = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(pools=()))
    out = tmp_path / "res"
    common = [cache, "--heads", "logistic", "--features", "penultimate", "--out", out,
              "--jobs", "1"]
    assert _fit_heads(*common).exit_code == 0
    path = out / "blobs_synthetic" / "heads" / "penultimate__logistic.json"
    first = read_result(path)
    again = _fit_heads(*common)
    assert again.exit_code == 0 and read_result(path) == first  # the same request: reused
    r = _fit_heads(*common, *change)
    assert r.exit_code == 0, r.output
    second = read_result(path)
    # refitted: the result on disk is the new request's
    assert second["settings"]["request"] != first["settings"]["request"]
    assert "up to date" not in r.output


# -- export: the PCA's mean is subtracted ----------------------------------------------------

def test_exported_pca_without_a_scaler_subtracts_the_mean():
    """Mutation: the folded PCA adds its mean. Features far from 0 and no StandardScaler in
    front make the PCA mean large, so the sign shows in every score."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 12)) * 2
    y = np.repeat(np.arange(3), 40)
    X = (centers[y] + rng.normal(size=(len(y), 12)) + 50.0).astype(np.float32)
    pipe = Pipeline([("pca", IncrementalPCA(4))]
                    + build_head("logistic", standardize=False, params={"C": 1.0}).steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(X, y)
    assert np.abs(pipe.named_steps["pca"].mean_).min() > 40
    with torch.no_grad():
        got = head_module(pipe, 3)(torch.from_numpy(X)).numpy()
    # float32 layers against sklearn's float64: scores of order 10 agree to ~1e-5
    np.testing.assert_allclose(got, class_scores(pipe, X, 3), rtol=1e-4, atol=1e-4)
