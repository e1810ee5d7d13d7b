"""featx.stats: intervals that cover, tests that agree with scipy, calibration by hand."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import brier_score_loss, roc_auc_score

from featx.metrics import classification_metrics
from featx.stats import (
    Resamples,
    bootstrap_distribution,
    bootstrap_p,
    calibration,
    delong_test,
    draw_resamples,
    holm,
    mcnemar_exact,
    metric_intervals,
    percentile_interval,
)

# --- a population with known metrics ---------------------------------------------------------
# negatives score N(0, 1), positives N(D, 1); predicted positive above T. Then recall_0 =
# Phi(T), recall_1 = 1 - Phi(T - D) and ROC-AUC = Phi(D / sqrt 2), exactly.
D, T = 1.5, 0.9
N0, N1 = 200, 100  # class counts of every test set (what a stratified bootstrap holds fixed)
R0, R1 = sps.norm.cdf(T), sps.norm.sf(T - D)
TRUE = {"accuracy": (N0 * R0 + N1 * R1) / (N0 + N1), "balanced_accuracy": (R0 + R1) / 2,
        "roc_auc": sps.norm.cdf(D / np.sqrt(2))}


def _test_set(rng, n0=N0, n1=N1):
    y = np.repeat([0, 1], [n0, n1])
    s = rng.normal(size=n0 + n1) + D * y
    return y, (s > T).astype(int), np.column_stack([-s, s])


def _coverage(draws=200, n_boot=250, inflate=1):
    """Share of ``draws`` simulated test sets whose 95% interval covers the truth, per metric.
    ``inflate`` > 1 computes the interval as if the test set were that many times larger
    (each image counted ``inflate`` times): the wrong n."""
    rng = np.random.default_rng(12345)
    hits = {k: 0 for k in TRUE}
    for _ in range(draws):
        y, pred, score = _test_set(rng)
        y, pred, score = np.tile(y, inflate), np.tile(pred, inflate), np.tile(score, (inflate, 1))
        iv = metric_intervals(y, pred, score, ["neg", "pos"], n_boot=n_boot,
                              seed=int(rng.integers(1 << 31)))
        for k in TRUE:
            hits[k] += iv[k][0] <= TRUE[k] <= iv[k][1]
    return {k: h / draws for k, h in hits.items()}


def test_95_percent_intervals_cover_the_truth_in_90_to_99_percent_of_200_test_sets():
    coverage = _coverage()
    for metric, share in coverage.items():
        assert 0.90 <= share <= 0.99, (metric, share)


def test_an_interval_computed_with_the_wrong_n_fails_the_coverage_check():
    # four times the images: the interval is half as wide and covers ~68% of the time
    coverage = _coverage(inflate=4)
    assert all(not 0.90 <= share <= 0.99 for share in coverage.values()), coverage


# --- the vectorised bootstrap is scipy's bootstrap --------------------------------------------

def test_identity_resample_gives_classification_metrics_exactly():
    rng = np.random.default_rng(0)
    for k in (2, 4):
        y = rng.integers(0, k, 150)
        logits = rng.normal(size=(150, k))
        logits[np.arange(150), y] += 1.0
        logits = np.round(logits, 1)  # ties in the scores
        prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        pred = prob.argmax(1)
        m = classification_metrics(y, pred, prob, [f"c{i}" for i in range(k)])
        d = bootstrap_distribution(y, pred, prob, k,
                                   Resamples(np.arange(150)[None, :], 0, True))
        for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
            # same arithmetic in another order: float64 rounding only
            assert d[key][0] == pytest.approx(m[key], abs=1e-12), (k, key)
        assert d["per_class_recall"][0] == pytest.approx(list(m["per_class_recall"].values()))


@pytest.mark.parametrize("decimals", [1, None])  # many ties, none
def test_resampled_auc_is_sklearns_on_each_resample(decimals):
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + y
    s = np.round(s, decimals) if decimals else s
    for stratified in (True, False):
        res = draw_resamples(y, 8, seed=1, stratified=stratified)
        got = bootstrap_distribution(y, (s > 0.5).astype(int), np.column_stack([-s, s]), 2,
                                     res)["roc_auc"]
        ref = [roc_auc_score(y[i], s[i]) for i in res.index]
        assert got == pytest.approx(ref, abs=1e-12)  # float64 sums in another order


def test_stratified_resamples_keep_every_class_count():
    y = np.repeat([0, 1, 2], [5, 30, 11])
    res = draw_resamples(y, 50, seed=3)
    for row in res.index:
        assert np.bincount(y[row], minlength=3).tolist() == [5, 30, 11]
    again = draw_resamples(y, 50, seed=3)
    assert np.array_equal(res.index, again.index)  # seeded


def _scipy_interval(statistic, *data, n_resamples=4000, seed=1):
    r = sps.bootstrap(data, statistic, paired=True, vectorized=False, method="percentile",
                      n_resamples=n_resamples, random_state=np.random.default_rng(seed))
    return r.confidence_interval.low, r.confidence_interval.high


# Monte-Carlo error: with 4000 resamples each, the 2.5% and 97.5% quantiles of two bootstraps
# of the same data differ by about 0.1-0.2 of the metric's standard error (~0.025 here)
MC_TOL = 0.01


def test_unstratified_intervals_agree_with_scipy_bootstrap():
    rng = np.random.default_rng(7)
    y, pred, score = _test_set(rng, 180, 120)
    res = draw_resamples(y, 4000, seed=2, stratified=False)
    d = bootstrap_distribution(y, pred, score, 2, res)
    ours = percentile_interval(d["accuracy"])
    ref = _scipy_interval(lambda a, b: np.mean(a == b), y, pred)
    assert ours == pytest.approx(ref, abs=MC_TOL)
    ours = percentile_interval(d["roc_auc"])
    ref = _scipy_interval(lambda a, s: roc_auc_score(a, s), y, score[:, 1], n_resamples=800)
    assert ours == pytest.approx(ref, abs=MC_TOL)


def test_stratified_per_class_recall_agrees_with_scipy_bootstrap_of_that_class():
    # within one class, the stratified bootstrap is an ordinary bootstrap of its images
    rng = np.random.default_rng(8)
    y, pred, score = _test_set(rng)
    d = bootstrap_distribution(y, pred, score, 2, draw_resamples(y, 4000, seed=5))
    for c in (0, 1):
        correct = (pred == y)[y == c].astype(float)
        ref = _scipy_interval(np.mean, correct)
        # a recall takes values k / n_c: two bootstraps' quantiles may sit one step apart
        tol = MC_TOL + 1 / len(correct)
        assert percentile_interval(d["per_class_recall"][:, c]) == pytest.approx(ref, abs=tol)


# --- paired tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_mcnemar_equals_binomtest_on_the_discordant_pairs(seed):
    rng = np.random.default_rng(seed)
    a = rng.random(300) < 0.8
    b = rng.random(300) < 0.75 + 0.02 * seed
    got = mcnemar_exact(a, b)
    n01, n10 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    ref = sps.binomtest(n01, n01 + n10, 0.5).pvalue
    assert got["p"] == pytest.approx(ref, rel=1e-12)


def test_a_head_right_on_all_60_discordant_images_gets_p_below_1e_10():
    a = np.ones(200, dtype=bool)
    b = np.ones(200, dtype=bool)
    b[:60] = False
    assert mcnemar_exact(a, b)["p"] < 1e-10


def test_identical_predictions_give_delta_0_and_p_1():
    rng = np.random.default_rng(1)
    y, pred, score = _test_set(rng)
    res = draw_resamples(y, 300)
    d = bootstrap_distribution(y, pred, score, 2, res)
    delta = d["balanced_accuracy"] - d["balanced_accuracy"]
    assert bootstrap_p(delta) == 1.0
    assert percentile_interval(delta) == (0.0, 0.0)
    assert mcnemar_exact(pred == y, pred == y)["p"] == 1.0
    assert delong_test(y, score[:, 1], score[:, 1])["p"] == 1.0


def test_delong_variance_agrees_with_the_bootstrap_variance_of_the_auc_difference():
    rng = np.random.default_rng(11)
    n0, n1 = 1200, 800  # 2,000 synthetic images
    y = np.repeat([0, 1], [n0, n1])
    shared = rng.normal(size=n0 + n1)  # two correlated scores of the same images
    a = shared + 1.0 * y + 0.8 * rng.normal(size=n0 + n1)
    b = shared + 0.8 * y + 0.8 * rng.normal(size=n0 + n1)
    dl = delong_test(y, a, b)
    assert dl["auc_a"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    res = draw_resamples(y, 2000, seed=4)  # DeLong's variance holds the class counts fixed
    auc_a = bootstrap_distribution(y, (a > 0.5).astype(int), np.column_stack([-a, a]), 2,
                                   res)["roc_auc"]
    auc_b = bootstrap_distribution(y, (b > 0.5).astype(int), np.column_stack([-b, b]), 2,
                                   res)["roc_auc"]
    boot_var = np.var(auc_a - auc_b, ddof=1)
    # the variance of a variance estimated from 2000 resamples: sd ~ sqrt(2/2000) = 3%;
    # 15% is ~5 sd, and the bootstrap's own O(1/n) bias is far smaller
    assert boot_var / dl["var"] == pytest.approx(1.0, abs=0.15)
    assert 0 < dl["p"] < 1


def test_holm_matches_a_hand_computation():
    p = [0.01, 0.04, 0.03, float("nan"), 0.20]
    # sorted 0.01, 0.03, 0.04, 0.20 with m = 4: 0.04, 0.09, max(0.09, 0.08), 0.20
    assert holm(p)[[0, 2, 1, 4]] == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert np.isnan(holm(p)[3])


# --- calibration -----------------------------------------------------------------------------

def test_ece_and_brier_match_a_hand_computation():
    y = np.array([0, 1, 1, 0])
    prob = np.array([[0.9, 0.1], [0.28, 0.72], [0.68, 0.32], [0.55, 0.45]])
    cal = calibration(y, prob)
    # top-class confidences 0.9 (right), 0.72 (right), 0.68 (wrong), 0.55 (right); 15 bins
    # of width 1/15: 0.9 in (0.867, 0.933], 0.72 and 0.68 share (0.667, 0.733] (accuracy
    # 1/2, confidence 0.70; with 10 bins they would not), 0.55 in (0.533, 0.6]
    ece = (abs(1 - 0.9) + 2 * abs(0.5 - 0.70) + abs(1 - 0.55)) / 4
    assert cal["ece"] == pytest.approx(ece)
    brier = (2 * 0.1 ** 2 + 2 * 0.28 ** 2 + 2 * 0.68 ** 2 + 2 * 0.45 ** 2) / 4
    assert cal["brier"] == pytest.approx(brier)


def test_brier_is_sklearns_multiclass_form_for_two_classes():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500)
    p1 = np.clip(0.3 + 0.4 * y + 0.2 * rng.normal(size=500), 0, 1)
    prob = np.column_stack([1 - p1, p1])
    # the multi-class form sums over both classes: twice the usual binary Brier score
    assert calibration(y, prob)["brier"] == pytest.approx(2 * brier_score_loss(y, p1))
    assert calibration(y, prob)["brier"] == pytest.approx(
        brier_score_loss(y, prob, scale_by_half=False))


def test_decision_scores_get_no_calibration():
    cal = calibration([0, 1], None)
    assert cal["ece"] is None and cal["brier"] is None and "decision" in cal["calibration_note"]


def test_a_large_test_set_is_scored_in_blocks_of_resamples_with_the_same_numbers(monkeypatch):
    import featx.stats as st
    rng = np.random.default_rng(3)
    y, pred = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    prob = rng.random((500, 3))
    prob /= prob.sum(1, keepdims=True)
    res = draw_resamples(y, 300)
    whole = bootstrap_distribution(y, pred, prob, 3, res, probabilities=True)
    monkeypatch.setattr(st, "_CHUNK", 500 * 7)  # blocks of 7 resamples
    blocks = bootstrap_distribution(y, pred, prob, 3, res, probabilities=True)
    assert whole.keys() == blocks.keys()
    for key in whole:  # the same arithmetic per resample: equal, not just close
        assert np.array_equal(whole[key], blocks[key], equal_nan=True), key
