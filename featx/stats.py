"""How sure is a number, and is one method really better than another on the same images?

Everything here works on stored per-image test outputs (labels, predictions, class scores),
never by fitting again, and is the one implementation for heads and fine-tuning:

- :func:`draw_resamples` draws a seeded bootstrap of the test images, stratified by class
  (each resample keeps every class's count), as one index matrix of shape (n_boot, n);
- :func:`bootstrap_distribution` computes every test metric on every resample at once
  (vectorised: ``np.bincount`` over the index matrix, no Python loop over resamples), and
  :func:`metric_intervals` turns that into 95% percentile intervals;
- :func:`calibration` gives the expected calibration error and the Brier score,
  :func:`reliability_bins` the reliability diagram's bins;
- :func:`mcnemar_exact`, :func:`delong_test`, :func:`bootstrap_p` and :func:`holm` are the
  paired tests :mod:`featx.report.paired` runs between rows scored on the same images.

Why percentile intervals and not BCa, and what the numbers mean: docs/statistics.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from featx.metrics import auc_scores

__all__ = ["ECE_BINS", "INTERVAL_LEVEL", "INTERVAL_METHOD", "Resamples", "bootstrap_distribution",
           "bootstrap_p", "calibration", "delong_test", "draw_resamples", "holm",
           "mcnemar_exact", "metric_intervals", "percentile_interval", "reliability_bins",
           "scored_metrics"]

INTERVAL_LEVEL = 0.95
INTERVAL_METHOD = "percentile"
ECE_BINS = 15  # equal-width bins on the top-class confidence (Guo et al. 2017)

# elements of the index matrix scored in one pass (int64 temporaries of ~160 MB each)
_CHUNK = 20_000_000

# metrics with an interval, in their order in result["metrics"]["intervals"]
_SCALAR = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "brier")


@dataclass(frozen=True)
class Resamples:
    """A bootstrap of ``n`` test images: ``index`` of shape (n_boot, n), row b = the images
    of resample b (indices into the test list, with repeats).

    ``stratified``: each resample holds exactly as many images of each class as the test
    set (the class counts are a property of the test set, not random). ``seed`` made it.
    """

    index: np.ndarray
    seed: int
    stratified: bool

    @property
    def n_boot(self) -> int:
        return self.index.shape[0]

    def describe(self) -> dict:
        """What the result JSON records beside the intervals."""
        return {"method": INTERVAL_METHOD, "level": INTERVAL_LEVEL, "n_boot": self.n_boot,
                "seed": self.seed, "stratified": self.stratified, "unit": "test image"}


def draw_resamples(y: Sequence[int], n_boot: int, *, seed: int = 0,
                   stratified: bool = True) -> Resamples:
    """``n_boot`` bootstrap resamples of the ``len(y)`` test images.

    Parameters
    ----------
    y : array-like of shape (n,)
        Integer labels of the test images.
    n_boot : int
        Number of resamples (at least 1).
    seed : int, default 0
        Seed of ``numpy.random.default_rng``: the same seed, labels and ``n_boot`` give the
        same resamples on every machine.
    stratified : bool, default True
        Resample within each class (the class counts stay those of the test set), else
        from all images at once.
    """
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    rng = np.random.default_rng(seed)
    # int32 halves the memory of the (n_boot, n) matrix; a test set has far fewer rows
    if not stratified:
        return Resamples(rng.integers(0, n, size=(n_boot, n), dtype=np.int32), seed, False)
    index = np.empty((n_boot, n), dtype=np.int32)
    for c in np.unique(y):  # each class's own images, drawn with replacement
        members = np.flatnonzero(y == c).astype(np.int32)
        index[:, members] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
    return Resamples(index, seed, True)


def _per_resample_counts(values: np.ndarray, index: np.ndarray, size: int,
                         weights: np.ndarray | None = None) -> np.ndarray:
    """(n_boot, size): per resample, the count (or weight sum) of each value in 0..size-1 of
    ``values[index]``; one ``bincount`` over the whole matrix."""
    n_boot = index.shape[0]
    flat = (values[index] + (np.arange(n_boot, dtype=np.int64) * size)[:, None]).ravel()
    w = None if weights is None else weights[index].ravel()
    return np.bincount(flat, weights=w, minlength=n_boot * size).reshape(n_boot, size)


def _binary_auc(positive: np.ndarray, score: np.ndarray, resamples: Resamples) -> np.ndarray:
    """(n_boot,) ROC-AUC of ``score`` for ``positive`` on each resample (ties count 1/2),
    as sklearn's ``roc_auc_score`` computes it; NaN where a resample lacks a class.

    AUC = mean over (positive, negative) pairs of 1[s+ > s-] + 1/2 1[s+ = s-]: per resample
    the negatives drawn are counted per distinct negative score and cumulated, and each
    positive drawn looks up how many lie below (and at) its score.
    """
    idx = resamples.index
    pos_cols, neg_cols = np.flatnonzero(positive), np.flatnonzero(~positive)
    if not len(pos_cols) or not len(neg_cols):
        return np.full(idx.shape[0], np.nan)
    if not resamples.stratified:  # the columns do not keep their class: count by weights
        uniq, inv = np.unique(score, return_inverse=True)
        inv = inv.astype(np.int64)
        both = _per_resample_counts(inv, idx, len(uniq))
        pos = _per_resample_counts(inv, idx, len(uniq), positive.astype(np.float64))
        neg = both - pos
        below = np.cumsum(neg, axis=1) - neg
        with np.errstate(invalid="ignore", divide="ignore"):
            return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))
    # stratified: every resample holds all n_pos positives and n_neg negatives. Code each
    # negative by its distinct value u, each positive by lo = the number of distinct
    # negative values below it; then per resample
    #   wins = sum_u negatives_drawn[u] * positives_drawn_with_lo_above[u]  (+ ties / 2)
    # which is two bincounts and a cumulative sum, no per-image lookup per resample.
    neg_values, neg_code = np.unique(score[neg_cols], return_inverse=True)
    n_u = len(neg_values)
    lo = np.searchsorted(neg_values, score[pos_cols], side="left")
    tie = (lo < n_u) & (neg_values[np.minimum(lo, n_u - 1)] == score[pos_cols])
    # one code per image, one bincount over the whole matrix: negatives 0..U-1 by value,
    # positives U + lo (U + 2 lo + tie when some positive equals a negative value)
    step = 2 if tie.any() else 1
    code = np.empty(len(score), dtype=np.int64)
    code[neg_cols] = neg_code
    code[pos_cols] = n_u + step * lo + (tie if step == 2 else 0)
    counts = _per_resample_counts(code, idx, n_u + step * (n_u + 1))
    neg = counts[:, :n_u]
    pos_lo = counts[:, n_u:] if step == 1 else counts[:, n_u::2] + counts[:, n_u + 1::2]
    # positives drawn with lo > u, for u = 0..U-1: a cumulative sum from the right
    above = np.cumsum(pos_lo[:, :0:-1], axis=1)[:, ::-1]
    wins = np.einsum("bu,bu->b", neg, above, dtype=np.float64)
    if step == 2:  # a positive equal to a negative value counts 1/2 per such negative
        wins += 0.5 * np.einsum("bu,bu->b", neg, counts[:, n_u + 1:-1:2], dtype=np.float64)
    return wins / (len(pos_cols) * len(neg_cols))


def bootstrap_distribution(y: Sequence[int], pred: Sequence[int], score: np.ndarray | None,
                           n_classes: int, resamples: Resamples, *,
                           probabilities: bool = False) -> dict[str, np.ndarray]:
    """Every test metric on every resample.

    Parameters
    ----------
    y, pred : array-like of shape (n,)
        Integer labels and predictions.
    score : ndarray of shape (n, n_classes) or None
        Class scores (higher = more likely); ROC-AUC is left out without them.
    n_classes : int
    resamples : Resamples
        From :func:`draw_resamples` on the same ``y``.
    probabilities : bool, default False
        Whether ``score`` holds probabilities (then the Brier score is included).

    Returns
    -------
    dict of ndarray of shape (n_boot,): ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
    ``roc_auc`` (binary, or one-vs-rest macro), ``brier``; and ``per_class_recall`` of shape
    (n_boot, n_classes). The same definitions as :func:`featx.metrics.classification_metrics`
    (on the identity resample they give its numbers).
    """
    rows = max(1, _CHUNK // max(resamples.index.shape[1], 1))
    if resamples.n_boot > rows:  # a large test set: resamples in blocks, bounded temporaries
        parts = [bootstrap_distribution(
            y, pred, score, n_classes,
            Resamples(resamples.index[i:i + rows], resamples.seed, resamples.stratified),
            probabilities=probabilities) for i in range(0, resamples.n_boot, rows)]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    idx, k = resamples.index, n_classes
    # one bincount: each resample's confusion matrix (rows true, columns predicted)
    cm = _per_resample_counts(y * k + pred, idx, k * k).reshape(-1, k, k)
    n_true, n_pred = cm.sum(2), cm.sum(1)
    hits = np.diagonal(cm, axis1=1, axis2=2).astype(np.float64)
    present = n_true > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(present, hits / np.where(present, n_true, 1), np.nan)
        denom = n_true + n_pred  # 2TP + FP + FN
        f1 = np.where(denom > 0, 2 * hits / np.where(denom > 0, denom, 1), 0.0)
    out = {
        "accuracy": hits.sum(1) / idx.shape[1],
        # mean recall over the classes present in the resample (sklearn's rule, as in metrics)
        "balanced_accuracy": np.nanmean(np.where(present, recall, np.nan), axis=1),
        "macro_f1": f1.mean(1),  # over all classes, zero_division=0 as metrics computes it
        "per_class_recall": recall,
    }
    if score is not None:
        s = auc_scores(np.asarray(score, dtype=np.float64), k)
        if s is not None:
            if k == 2:
                out["roc_auc"] = _binary_auc(y == 1, s[:, 1], resamples)
            else:
                out["roc_auc"] = np.mean([_binary_auc(y == c, s[:, c], resamples)
                                          for c in range(k)], axis=0)
        if probabilities:
            out["brier"] = _brier_per_image(y, np.asarray(score, dtype=np.float64))[idx].mean(1)
    return out


def percentile_interval(samples: np.ndarray, level: float = INTERVAL_LEVEL
                        ) -> tuple[float, float] | None:
    """The ``level`` percentile interval of bootstrap ``samples`` (NaN resamples left
    out); None when there are none."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return None
    alpha = (1 - level) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha])
    return float(lo), float(hi)


def metric_intervals(y: Sequence[int], pred: Sequence[int], score: np.ndarray | None,
                     classes: Sequence[str], *, n_boot: int, seed: int = 0,
                     probabilities: bool = False) -> dict:
    """``{"accuracy": [lo, hi], ..., "per_class_recall": {class: [lo, hi]}}`` and
    ``"bootstrap"``: how they were made (:meth:`Resamples.describe`).

    95% percentile intervals over a stratified bootstrap of the test images
    (:func:`draw_resamples`, :func:`bootstrap_distribution`). A metric that is undefined
    (no scores, a class absent from the test set) has no interval (None).
    """
    res = draw_resamples(y, n_boot, seed=seed)
    dist = bootstrap_distribution(y, pred, score, len(classes), res, probabilities=probabilities)
    out: dict = {}
    for key in _SCALAR:
        iv = percentile_interval(dist[key]) if key in dist else None
        out[key] = list(iv) if iv else None
    recall = dist["per_class_recall"]
    out["per_class_recall"] = {c: (list(iv) if (iv := percentile_interval(recall[:, i])) else None)
                               for i, c in enumerate(classes)}
    out["bootstrap"] = res.describe()
    return out


def scored_metrics(y: Sequence[int], pred: Sequence[int], score: np.ndarray | None,
                 classes: Sequence[str], *, probabilities: bool, n_boot: int,
                 seed: int = 0) -> dict:
    """The test metrics of a result, the same for heads and fine-tuning:
    :func:`featx.metrics.classification_metrics`, :func:`calibration` (``ece``, ``brier``;
    None unless ``probabilities``) and, with ``n_boot`` > 0, ``intervals``
    (:func:`metric_intervals`)."""
    from featx.metrics import classification_metrics
    metrics = classification_metrics(y, pred, score, classes)
    metrics.update(calibration(y, score if probabilities else None))
    metrics["score_kind"] = "probability" if probabilities else "decision"
    if n_boot > 0:
        metrics["intervals"] = metric_intervals(y, pred, score, classes, n_boot=n_boot,
                                                seed=seed, probabilities=probabilities)
    return metrics


# --- calibration -----------------------------------------------------------------------------

def _brier_per_image(y: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """(n,): sum over classes of (p_k - 1[y = k])^2 (Brier's multi-class form, 0..2)."""
    onehot = np.zeros_like(prob)
    onehot[np.arange(len(y)), y] = 1.0
    return ((prob - onehot) ** 2).sum(1)


def reliability_bins(y: Sequence[int], prob: np.ndarray, n_bins: int = ECE_BINS
                     ) -> dict[str, np.ndarray]:
    """Equal-width bins on the top-class confidence: per bin its ``count``, mean
    ``confidence`` and ``accuracy`` (NaN for empty bins), and the ``edges`` (n_bins + 1)."""
    y = np.asarray(y, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    conf, top = prob.max(1), prob.argmax(1)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bins (a, b]: confidence 1/K..1, and 1.0 lands in the last bin
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(which, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(which, weights=(top == y).astype(float), minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": confidence, "accuracy": accuracy}


def calibration(y: Sequence[int], prob: np.ndarray | None, n_bins: int = ECE_BINS) -> dict:
    """``ece`` (expected calibration error: sum over bins of count/n x |accuracy -
    confidence|, :data:`ECE_BINS` equal-width bins on the top-class confidence) and ``brier``
    (mean over images of sum over classes of (p_k - 1[y = k])^2).

    ``prob`` : ndarray of shape (n, n_classes) of probabilities, or None for a method whose
    scores are not probabilities: then both are None and ``calibration_note`` says why.
    """
    if prob is None:
        return {"ece": None, "brier": None,
                "calibration_note": "the head gives decision scores, not probabilities"}
    y = np.asarray(y, dtype=np.int64)
    prob = np.asarray(prob, dtype=np.float64)
    bins = reliability_bins(y, prob, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return {"ece": float((bins["count"][filled] / len(y) * gap).sum()),
            "brier": float(_brier_per_image(y, prob).mean()), "ece_bins": n_bins,
            "calibration_note": None}


# --- paired tests ----------------------------------------------------------------------------

def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """McNemar's exact test of equal accuracy on the same images.

    ``b``: images only A gets right, ``c``: only B; under equal accuracy the ``b + c``
    discordant images split as Binomial(b + c, 1/2). Two-sided p = min(1, 2 P(X <= min(b, c)))
    (1 without discordant images).
    """
    from scipy.stats import binom
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    b, c = int(np.sum(a & ~b_)), int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(min(1.0, 2 * binom.cdf(min(b, c), b + c, 0.5)))
    return {"b": b, "c": c, "p": p}


def _midrank_placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components: V10 (n_pos,) and V01 (n_neg,) of one score."""
    from scipy.stats import rankdata
    m, n = len(pos), len(neg)
    r_all = rankdata(np.concatenate([pos, neg]))
    v10 = (r_all[:m] - rankdata(pos)) / n        # share of negatives below each positive
    v01 = 1.0 - (r_all[m:] - rankdata(neg)) / m  # share of positives above each negative
    return v10, v01


def delong_test(y: Sequence[int], score_a: np.ndarray, score_b: np.ndarray) -> dict:
    """DeLong's test of equal ROC-AUC of two scores on the same binary-labelled images.

    Returns ``auc_a``, ``auc_b``, ``var`` (DeLong's variance of auc_a - auc_b, DeLong et al.
    1988, computed with midranks as in Sun & Xu 2014) and the two-sided normal ``p``
    (1 when the variance is 0: identical rankings).
    """
    from scipy.stats import norm
    y = np.asarray(y).astype(bool)
    comps = [_midrank_placements(np.asarray(s, float)[y], np.asarray(s, float)[~y])
             for s in (score_a, score_b)]
    v10 = np.stack([c[0] for c in comps])
    v01 = np.stack([c[1] for c in comps])
    auc = v10.mean(1)
    cov = np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[0] - auc[1])
    if var <= 1e-15:
        p = 1.0 if abs(diff) < 1e-12 else 0.0
    else:
        p = float(2 * norm.sf(abs(diff) / np.sqrt(var)))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "var": var, "p": p}


def bootstrap_p(delta: np.ndarray) -> float:
    """Two-sided p of a paired-bootstrap difference against 0: twice the smaller share of
    resamples on either side of 0, counted as (1 + k) / (1 + n_boot) so that it is never
    below what n_boot resamples can show (Davison & Hinkley 1997, eq. 4.11); 1 when every
    resample is 0 (identical predictions)."""
    delta = np.asarray(delta, dtype=np.float64)
    delta = delta[np.isfinite(delta)]
    if not len(delta):
        return float("nan")
    k = min(np.sum(delta >= 0), np.sum(delta <= 0))
    return float(min(1.0, 2 * (1 + k) / (1 + len(delta))))


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN stays NaN."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[j]))
        out[j] = running
    return out
