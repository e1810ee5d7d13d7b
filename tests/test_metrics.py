"""Every reported number agrees with scikit-learn's own functions on the same predictions,
and the result schema survives a round trip through JSON."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from featx.data import file_list_fingerprint
from featx.metrics import (RESULT_SCHEMA, classification_metrics, make_result, read_result,
                           write_json)

CLASSES = ["normal", "pneumonia", "covid", "other"]


def _predictions(seed=0, n=200, k=4, skill=1.5):
    """Labels, noisy probabilities that favour the true class, and their argmax."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += skill
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba.argmax(1), proba


def test_multiclass_metrics_agree_with_sklearn():
    y, pred, proba = _predictions()
    m = classification_metrics(y, pred, proba, CLASSES)
    assert m["n"] == len(y)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    recall = skm.recall_score(y, pred, average=None)
    assert list(m["per_class_recall"]) == CLASSES
    assert list(m["per_class_recall"].values()) == pytest.approx(recall.tolist())
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr",
                                                           average="macro"))
    assert m["roc_auc_note"] is None


def test_multiclass_decision_scores_are_softmaxed_for_one_vs_rest_auc():
    y, pred, proba = _predictions(seed=1)
    scores = np.log(proba) * 3.0 - 7.0  # same argmax, not probabilities
    m = classification_metrics(y, pred, scores, CLASSES)
    z = scores - scores.max(1, keepdims=True)
    soft = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, soft, multi_class="ovr"))


@pytest.mark.parametrize("shape", ["proba", "decision_1d"])
def test_binary_auc_uses_the_positive_class_score(shape):
    y, _, proba = _predictions(seed=2, k=2)
    pred = proba.argmax(1)
    score = proba if shape == "proba" else np.log(proba[:, 1] / proba[:, 0])
    m = classification_metrics(y, pred, score, ["neg", "pos"])
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_class_missing_from_y_true_gives_null_auc_with_a_reason_and_null_recall():
    y, pred, proba = _predictions(seed=3)
    keep = y != 2
    y, pred, proba = y[keep], pred[keep], proba[keep]
    m = classification_metrics(y, pred, proba, CLASSES)
    assert m["roc_auc"] is None and m["roc_auc_note"] == ("only 3 of 4 classes occur in the "
                                                          "test split")
    assert m["per_class_recall"]["covid"] is None
    assert 2 in pred  # the case sklearn warns about: a predicted class absent from y_true
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = skm.balanced_accuracy_score(y, pred)
    assert m["balanced_accuracy"] == pytest.approx(expected)
    assert np.array(m["confusion_matrix"]).shape == (4, 4)


def test_no_scores_means_no_auc_and_says_why():
    y, pred, _ = _predictions(seed=4)
    m = classification_metrics(y, pred, None, CLASSES)
    assert m["roc_auc"] is None and m["roc_auc_note"] == "the method gives no scores"


def test_result_round_trips_through_json_with_nan_as_null(tmp_path):
    y, pred, proba = _predictions(seed=5)
    metrics = classification_metrics(y, pred, proba, CLASSES)
    metrics["val_accuracy"] = float("nan")
    dataset = {"name": "xray", "classes": CLASSES, "split_fingerprint": "a" * 64,
               "test_fingerprint": file_list_fingerprint([("test/x.png", 1)])}
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


def test_fingerprint_depends_on_paths_labels_and_order():
    a = [("a.png", 0), ("b.png", 1)]
    assert file_list_fingerprint(a) == file_list_fingerprint(list(a))
    assert file_list_fingerprint(a) != file_list_fingerprint([("a.png", 0), ("b.png", 0)])
    assert file_list_fingerprint(a) != file_list_fingerprint(a[::-1])
    assert len(file_list_fingerprint([])) == 64
