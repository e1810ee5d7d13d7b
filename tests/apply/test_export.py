"""featx export: heads folded into torch layers give sklearn's numbers on the cached features;
the exported .pt2 (backbone + pooling + head) gives featx's own predictions on images."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.decomposition import IncrementalPCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from featx.apply import UnsupportedHeadError, head_module, predict, read_export_info
from featx.cache import Cache
from featx.data.images import TransformSpec
from featx.heads import build_head, class_scores
from tests.builders import invoke_cli as run

PARAMS = {"linear": {"alpha": 1.0}, "logistic": {"C": 0.1}, "svm": {"C": 0.01},
          "sgd": {"alpha": 1e-3}, "mlp": {"hidden_layer_sizes": (16,), "alpha": 1e-3}}


@pytest.fixture(scope="module")
def cached(head_experiment):
    """Train and test rows of the real cache: {feature: (X_train, y_train, X_test)}."""
    cache = Cache(head_experiment.cache)
    return {f: (cache.load("train", f), cache.labels("train"), cache.load("test", f))
            for f in ("penultimate", "pool2")}


def _sklearn_scores(pipe, X, n_classes):
    s = class_scores(pipe, X, n_classes)
    return np.column_stack([-s, s]) if s.ndim == 1 else s


@pytest.mark.parametrize("binary", [False, True], ids=["3-class", "binary"])
@pytest.mark.parametrize("head", ["linear", "logistic", "svm", "sgd", "mlp", "logistic-pca"])
def test_folded_head_equals_sklearn_on_cached_features(cached, head, binary):
    feature = "pool2" if head in ("logistic", "svm") else "penultimate"
    X, y, X_test = cached[feature]
    if binary:
        X, y = X[y < 2], y[y < 2]
    n_classes = 2 if binary else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if head == "logistic-pca":  # what fit-heads saves in --pca mode
            reducer = [("prescale", StandardScaler()), ("pca", IncrementalPCA(8))]
            pipe = Pipeline(reducer + build_head("logistic", params=PARAMS["logistic"]).steps)
        else:
            pipe = build_head(head, params=PARAMS[head], seed=0)
        pipe.fit(X, y)
    layers = head_module(pipe, n_classes)
    with torch.no_grad():
        got = layers(torch.from_numpy(X_test)).numpy()
    want = _sklearn_scores(pipe, X_test, n_classes)
    assert got.shape == want.shape == (len(X_test), n_classes)
    assert np.array_equal(got.argmax(1), pipe.predict(X_test))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert len(np.unique(pipe.predict(X_test))) > 1  # a real decision, not a constant


def test_knn_and_rbf_heads_are_refused_with_one_line(head_experiment, cached, tmp_path):
    X, y, _ = cached["penultimate"]
    with pytest.raises(UnsupportedHeadError, match="SVC head has no exact torch form"):
        head_module(Pipeline([("scaler", StandardScaler()), ("head", SVC())]).fit(X, y), 3)
    r = run("export", head_experiment.results[("penultimate", "knn")], "--out",
            tmp_path / "knn.pt2")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == [
        "Error: a KNeighborsClassifier head has no exact torch form; export supports the "
        "linear, logistic, svm, sgd and mlp heads. Use featx predict for this one."]
    assert not (tmp_path / "knn.pt2").exists()


def test_exported_program_equals_featx_predict_on_images(head_experiment, tmp_path):
    ex = head_experiment
    result = ex.results[("pool2", "logistic")]
    out = tmp_path / "model.pt2"
    r = run("export", result, "--out", out)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out)
    info = read_export_info(out)
    assert info["classes"] == ["digit0", "digit1", "digit2"]
    assert info["input"]["dtype"] == "uint8" and info["input"]["shape"] == ["N", 3, 32, 32]

    # featx's own path: extract's forward + the sklearn pipeline, through featx predict
    files = sorted(ex.data.rglob("*.png"))[::6]
    pred_csv = tmp_path / "pred.csv"
    predict(result, files, pred_csv, progress=False)
    ref = pd.read_csv(pred_csv)

    # the exported program alone: torch.export + the documented preprocessing, no featx
    program = torch.export.load(out).module()
    t = TransformSpec(**info["input"]["transform"])
    batch = torch.stack([t.eval_transform_uint8()(Image.open(f).convert("RGB"))
                         for f in files])
    with torch.no_grad():
        scores = torch.cat([program(batch[:7]), program(batch[7:8]), program(batch[8:])])
    assert scores.shape == (len(files), 3)
    np.testing.assert_allclose(scores.numpy(), ref.filter(like="prob_").to_numpy(), atol=1e-5)
    assert [info["classes"][k] for k in scores.argmax(1).tolist()] == ref["predicted"].tolist()
