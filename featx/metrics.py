"""Every reported number, computed one way for heads and for fine-tuning.

:func:`classification_metrics` turns predictions into the metric dict; :func:`make_result`
wraps it into the one result schema (JSON) that both ``fit-heads`` and ``finetune`` write and
``report`` reads; :func:`write_json` writes it atomically.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featx.errors import FeatxError
from featx.files import atomic_write

__all__ = [
    "RESULT_SCHEMA",
    "classification_metrics",
    "make_result",
    "read_result",
    "write_json",
]

RESULT_SCHEMA = "featx-result/1"


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


def _roc_auc(y_true: np.ndarray, y_score: np.ndarray | None, n_classes: int):
    from sklearn import metrics as skm
    if y_score is None:
        return None, "the method gives no scores"
    y_score = np.asarray(y_score, dtype=np.float64)
    present = np.unique(y_true)
    if len(present) < n_classes:
        return None, f"only {len(present)} of {n_classes} classes occur in the test split"
    if not np.all(np.isfinite(y_score)):
        return None, "scores are not finite"
    if n_classes == 2:
        pos = y_score[:, 1] if y_score.ndim == 2 else y_score
        return float(skm.roc_auc_score(y_true, pos)), None
    # one-vs-rest needs probabilities that sum to 1; softmax decision scores when they don't
    if not np.allclose(y_score.sum(1), 1, atol=1e-4) or y_score.min() < 0:
        z = y_score - y_score.max(1, keepdims=True)
        y_score = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    return float(skm.roc_auc_score(y_true, y_score, multi_class="ovr", average="macro",
                                   labels=list(range(n_classes)))), None


def make_result(*, kind: str, method: str, dataset: dict, model: str, metrics: dict,
                timings: dict, settings: dict | None = None, selection: dict | None = None,
                feature: str | None = None, head: str | None = None,
                provenance: dict | None = None, artifacts: dict | None = None) -> dict:
    """One result record, the same schema for heads (``kind="head"``) and fine-tuning.

    ``dataset`` must hold ``name``, ``classes``, ``split_fingerprint`` (all splits' file lists)
    and ``test_fingerprint`` (the test list), which ``report`` uses to decide comparability.
    ``timings`` are wall seconds (``fit_s``, ``predict_s``, ``total_s``, ...).
    """
    from featx import __version__
    for key in ("name", "classes", "split_fingerprint", "test_fingerprint"):
        if key not in dataset:
            raise ValueError(f"dataset info lacks {key!r}")
    return {
        "schema": RESULT_SCHEMA,
        "featx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kind": kind,
        "method": method,
        "model": model,
        "feature": feature,
        "head": head,
        "dataset": dataset,
        "settings": settings or {},
        "selection": selection or {},
        "metrics": metrics,
        "timings": timings,
        "provenance": provenance or {},
        "artifacts": artifacts or {},
    }


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; null reads back in pandas as NaN
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (temporary file in the same folder, then replace)."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")
    return path


def read_result(path: str | Path) -> dict:
    """Load a result JSON and check its schema tag."""
    with open(path) as f:
        obj = json.load(f)
    if not isinstance(obj, dict) or obj.get("schema") != RESULT_SCHEMA:
        raise FeatxError(f"{path}: not a featx result (expected schema {RESULT_SCHEMA!r}, "
                         f"found {obj.get('schema') if isinstance(obj, dict) else None!r})")
    return obj
