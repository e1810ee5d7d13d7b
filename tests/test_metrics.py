"""Every reported number agrees with scikit-learn's own functions on the same predictions."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from featx.data import file_list_fingerprint
from featx.metrics import classification_metrics

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


def test_fingerprint_depends_on_paths_labels_and_order():
    a = [("a.png", 0), ("b.png", 1)]
    assert file_list_fingerprint(a) == file_list_fingerprint(list(a))
    assert file_list_fingerprint(a) != file_list_fingerprint([("a.png", 0), ("b.png", 0)])
    assert file_list_fingerprint(a) != file_list_fingerprint(a[::-1])
    assert len(file_list_fingerprint([])) == 64
