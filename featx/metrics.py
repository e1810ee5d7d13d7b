"""Every reported number, computed one way for heads and for fine-tuning.

:func:`classification_metrics` turns predictions into the metric dict that the result
record (:mod:`featx.results`) carries.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = [
    "auc_scores",
    "classification_metrics",
]


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int],
                           y_score: np.ndarray | None, classes: Sequence[str]) -> dict[str, Any]:
    """The metrics featx reports for one set of predictions.

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n_samples,)
        Integer labels, indices into ``classes``.
    y_score : ndarray of shape (n_samples, n_classes) or None
        Class probabilities or decision scores (higher = more likely); needed for ROC-AUC.
    classes : sequence of str
        Class names, in label order.

    Returns
    -------
    dict with ``accuracy``, ``balanced_accuracy``, ``macro_f1`` (all in [0, 1]), ``roc_auc``
    (one-vs-rest macro for more than two classes; ``None`` with ``roc_auc_note`` saying why
    when undefined), ``per_class_recall`` ({class: recall or None when absent from y_true}),
    ``confusion_matrix`` (rows = true, columns = predicted, in ``classes`` order), ``n``.
    """
    # imported here, not at the top: the cache imports this module, and a no-op `featx
    # extract` re-run must not pay for sklearn and scipy (as long again as torch to import)
    from sklearn import metrics as skm
    y_true = np.asarray(y_true, dtype=int)
    y_pred = np.asarray(y_pred, dtype=int)
    labels = list(range(len(classes)))
    present = np.unique(y_true)
    recall = skm.recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        # balanced accuracy = mean recall over the classes present in y_true (sklearn's rule)
        "balanced_accuracy": float(np.mean(recall[present])) if len(present) else float("nan"),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro",
                                       zero_division=0)),
        "per_class_recall": {c: (float(recall[i]) if i in present else None)
                             for i, c in enumerate(classes)},
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    out["roc_auc"], out["roc_auc_note"] = _roc_auc(y_true, y_score, len(classes))
    return out


def auc_scores(y_score: np.ndarray | None, n_classes: int) -> np.ndarray | None:
    """The scores ROC-AUC is computed from, of shape (n_samples, n_classes); None when there
    are none or they are not finite.

    A binary decision score of shape (n_samples,) becomes ``[-s, s]``; for more than two
    classes, scores that are not probabilities (rows not summing to 1, or negative) go
    through a softmax, since one-vs-rest macro AUC needs rows that sum to 1.
    """
    if y_score is None:
        return None
    y_score = np.asarray(y_score, dtype=np.float64)
    if not np.all(np.isfinite(y_score)):
        return None
    if y_score.ndim == 1:
        y_score = np.column_stack([-y_score, y_score])
    if n_classes > 2 and (not np.allclose(y_score.sum(1), 1, atol=1e-4) or y_score.min() < 0):
        z = y_score - y_score.max(1, keepdims=True)
        y_score = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return y_score


def _roc_auc(y_true: np.ndarray, y_score: np.ndarray | None, n_classes: int):
    from sklearn import metrics as skm
    if y_score is None:
        return None, "the method gives no scores"
    present = np.unique(y_true)
    if len(present) < n_classes:
        return None, f"only {len(present)} of {n_classes} classes occur in the test split"
    scores = auc_scores(y_score, n_classes)
    if scores is None:
        return None, "scores are not finite"
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true, scores[:, 1])), None
    return float(skm.roc_auc_score(y_true, scores, multi_class="ovr", average="macro",
                                   labels=list(range(n_classes)))), None
