"""The batched torch trainer of the linear family against sklearn, the reference.

Contract: on a moderate synthetic problem of realistic difficulty and on real images
(scikit-learn digits written as PNGs), ``solver="torch"`` chooses the same grid point as
``solver="sklearn"`` within one grid step and its test accuracy is within 0.5 points; the
ridge closed form equals sklearn's Ridge coefficients; the saved head is an ordinary sklearn
pipeline that loads from skops and predicts what the result recorded.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import Ridge, RidgeClassifier

from benchmarks.synthetic import realistic_features
from featx.data import load_dataset
from featx.heads import fit_heads, load_head
from featx.config import HeadsConfig
from featx.heads.batched import CPU_TORCH_MIN_CELLS, TORCH_MIN_CELLS, fit_grid, resolve_solver
from featx.heads.registry import get_head
from featx.heads.selection import select_and_fit
from tests.builders import write_cache, write_digits

LINEAR_FAMILY = ("linear", "logistic", "svm")


def _synthetic(n=(1200, 400, 600), d=96, classes=5, seed=3):
    X, y = next(realistic_features(sum(n), d, classes, seed=seed, chunk=sum(n)))
    a, b = n[0], n[0] + n[1]
    return (X[:a], y[:a]), (X[a:b], y[a:b]), (X[b:], y[b:])


def _digits_pixels(tmp_path):
    """Real images: sklearn's digits 0-9 as 16 px PNGs (the test builders' writer), read
    back as 256 grey pixels per image, train/val/test 0.6/0.2/0.2 of each class."""
    root = write_digits(tmp_path / "digits", classes=range(10), per_class=60, size=16,
                        layout="split")
    spec = load_dataset(root)
    out = {}
    for split, items in spec.splits.items():
        X = np.stack([np.asarray(Image.open(root / rel).convert("L"), np.float32).ravel()
                      for rel, _ in items])
        out[split] = (X / 255.0, np.array([lab for _, lab in items]))
    return out["train"], out["val"], out["test"], spec.classes


def _chosen_index(head, selection):
    key, values = next(iter(get_head(head).grid.items()))
    return list(values).index(selection["chosen"][key])


def _compare(head, train, val, test, **kw):
    got = {}
    for solver in ("sklearn", "torch"):
        model, sel, _ = select_and_fit(head, *train, *val, solver=solver, **kw)
        assert sel["solver"] == solver
        got[solver] = (_chosen_index(head, sel), float(np.mean(model.predict(test[0]) == test[1])))
    (i_ref, acc_ref), (i_t, acc_t) = got["sklearn"], got["torch"]
    assert abs(i_ref - i_t) <= 1, (head, got)
    # 0.5 points: the contract's bound (both solve the same objective; L-BFGS in float32
    # stops at a gradient of 1e-5, sklearn's lbfgs/liblinear in float64 at theirs)
    assert abs(acc_ref - acc_t) <= 0.005 + 1e-12, (head, got)
    return got


@pytest.mark.parametrize("head", LINEAR_FAMILY)
def test_torch_trainer_selects_and_scores_like_sklearn_on_synthetic(head):
    train, val, test = _synthetic()
    got = _compare(head, train, val, test)
    # realistic difficulty, not separable blobs: well above chance (0.2), far from 1
    assert 0.3 < got["sklearn"][1] < 0.95


@pytest.mark.parametrize("head", LINEAR_FAMILY)
def test_torch_trainer_selects_and_scores_like_sklearn_on_digits(head, tmp_path):
    train, val, test, _ = _digits_pixels(tmp_path)
    _compare(head, train, val, test)


def test_torch_trainer_matches_sklearn_with_cv_selection_and_class_weights():
    (X, y), _, test = _synthetic(n=(600, 10, 300), d=48, classes=3, seed=5)
    keep = (y != 2) | (np.arange(len(y)) % 3 == 0)  # an imbalanced class
    _compare("logistic", (X[keep], y[keep]), (None, None), test, select="cv", cv=3,
             class_weight="balanced")


@pytest.mark.parametrize("shape", [(300, 40), (60, 150)])  # d <= n: X^T X; d > n: X X^T
@pytest.mark.parametrize("classes", [2, 4])
def test_ridge_closed_form_equals_sklearn_ridge(shape, classes):
    rng = np.random.default_rng(0)
    n, d = shape
    X = (rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)).astype(np.float32)
    y = rng.integers(classes, size=n)
    alphas = [1000.0, 10.0, 0.1]
    W, b, _ = fit_grid("linear", X, y, alphas, classes)
    Y = -np.ones((n, classes))
    Y[np.arange(n), y] = 1
    Y = Y[:, 1:] if classes == 2 else Y
    for g, a in enumerate(alphas):
        ref = Ridge(alpha=a).fit(X.astype(np.float64), Y)
        ref_coef = np.atleast_2d(ref.coef_)  # Ridge gives (d,) for a one-column Y
        clf = RidgeClassifier(alpha=a).fit(X.astype(np.float64), y)
        # 1e-3 relative to the largest coefficient: the Gram matrix is accumulated in float32
        # (relative error ~1e-7 x sqrt(n)) and decomposed in float64, and this X is
        # correlated on purpose, so at alpha 0.1 the solve amplifies that error by the
        # condition number (~1e3); sklearn works in float64 throughout
        scale = np.abs(ref_coef).max()
        np.testing.assert_allclose(W[g].T, ref_coef, atol=1e-3 * scale, rtol=0)
        np.testing.assert_allclose(W[g].T, np.atleast_2d(clf.coef_), atol=1e-3 * scale, rtol=0)
        np.testing.assert_allclose(b[g], np.ravel(ref.intercept_), atol=1e-3 * max(1, scale), rtol=0)


def test_ridge_closed_form_with_class_weights_equals_sklearn():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(200, 12)).astype(np.float32)
    y = np.r_[np.zeros(150, int), np.ones(30, int), np.full(20, 2)]
    W, b, _ = fit_grid("linear", X, y, [3.0], 3, class_weight="balanced")
    clf = RidgeClassifier(alpha=3.0, class_weight="balanced").fit(X.astype(np.float64), y)
    scale = np.abs(clf.coef_).max()
    np.testing.assert_allclose(W[0].T, clf.coef_, atol=1e-3 * scale, rtol=0)  # as above
    np.testing.assert_allclose(b[0], clf.intercept_, atol=1e-3 * max(1, scale), rtol=0)


def test_fitted_scaler_equals_sklearns_standard_scaler():
    """The batched path's scaler (moments in row blocks) is sklearn's: the same mean,
    variance, constant-column rule and transform, on columns with large offsets."""
    from sklearn.preprocessing import StandardScaler
    from featx.heads.batched import fitted_scaler
    rng = np.random.default_rng(4)
    X = (rng.normal(size=(2500, 30)) * rng.uniform(0.01, 5, 30)
         + rng.uniform(-3, 1e4, 30)).astype(np.float32)
    X[:, 3] = 7.0                                  # constant: scale 1, as sklearn sets it
    X[:, 4] = X[0, 4] + np.float32(1e-3) * (np.arange(2500) % 2)   # tiny but real spread
    ref, got = StandardScaler().fit(X), fitted_scaler(X, block=700)
    np.testing.assert_allclose(got.mean_, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(got.var_, ref.var_, rtol=1e-9, atol=1e-18)
    np.testing.assert_array_equal(got.scale_ == 1.0, ref.scale_ == 1.0)
    np.testing.assert_allclose(got.scale_, ref.scale_, rtol=1e-9)
    assert got.n_samples_seen_ == ref.n_samples_seen_ and got.n_features_in_ == 30
    np.testing.assert_allclose(got.transform(X), ref.transform(X), rtol=1e-5, atol=1e-5)
    # float64 rows: a column whose spread is rounding noise next to its mean is constant
    X64 = rng.normal(size=(2500, 3))
    X64[:, 1] = 1e8 + 1e-7 * rng.normal(size=2500)   # a few ulps: var ~1e-14, not 0
    ref, got = StandardScaler().fit(X64), fitted_scaler(X64, block=700)
    assert ref.scale_[1] == 1.0
    np.testing.assert_array_equal(got.scale_ == 1.0, ref.scale_ == 1.0)


@pytest.mark.parametrize("loss", ["multinomial", "binary", "squared_hinge"])
@pytest.mark.parametrize("weighted", [False, True])
def test_hand_written_gradients_equal_autograd_of_the_same_objective(loss, weighted):
    """The L-BFGS objective's gradients are written out by hand (for speed); autograd of the
    same loss, written the plain way, is the independent reference."""
    import torch
    from featx.heads.batched import _objective
    g = torch.Generator().manual_seed(0)
    n, d, r, K = 50, 7, 5, 3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    V = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    k = 1 if loss == "binary" else K
    if loss == "multinomial":
        Y = torch.randint(K, (n,), generator=g)
    else:
        Y = torch.where(torch.rand(n, k, generator=g) < 0.4, 1.0, -1.0).double()
    sw = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5) if weighted \
        else torch.ones(n, dtype=torch.float64)
    if loss == "squared_hinge":
        sw = sw[:, None].expand(n, k) * (1 + (Y > 0))     # per-subproblem weights (n, K')
    total = sw.sum(0)
    reg = torch.tensor(0.7, dtype=torch.float64)
    scale = torch.rand(r, generator=g, dtype=torch.float64) + 0.3
    U = torch.randn(r, k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(k, generator=g, dtype=torch.float64, requires_grad=True)
    f, dU, db = _objective(loss, X, V, Y, sw, total, reg, scale, U.detach(), b.detach())
    Z = X @ V @ (U * scale[:, None]) + b
    W2 = ((U * scale[:, None]) ** 2).sum()
    if loss == "multinomial":
        ref = (sw * torch.nn.functional.cross_entropy(Z, Y, reduction="none")).sum() / total \
            + reg * W2 / total
    elif loss == "binary":
        ref = (sw * torch.log1p(torch.exp(-Y * Z))[:, 0]).sum() / total + reg * W2 / total
    else:
        per_class = ((sw * torch.clamp(1 - Y * Z, min=0) ** 2).sum(0)
                     + reg * (((U * scale[:, None]) ** 2).sum(0) + b ** 2)) / total
        ref = per_class.sum()
    ref.backward()
    np.testing.assert_allclose(float(f), float(ref.detach()), rtol=1e-10)
    np.testing.assert_allclose(dU.numpy(), U.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(db.numpy(), b.grad.numpy(), rtol=1e-8, atol=1e-12)


def test_torch_heads_are_saved_as_sklearn_pipelines_that_predict_the_result(tmp_path):
    (Xtr, ytr), (Xv, yv), (Xte, yte) = _synthetic(n=(300, 100, 150), d=32, classes=3)
    splits = {"train": ({"penultimate": Xtr}, ytr), "val": ({"penultimate": Xv}, yv),
              "test": ({"penultimate": Xte}, yte)}
    cache = write_cache(tmp_path / "syn.h5", splits)
    run = fit_heads([cache], HeadsConfig(heads=LINEAR_FAMILY, solver="torch",
                                         out_dir=tmp_path / "out"))
    for res, path in zip(run.results, run.json_paths):
        assert res["settings"]["solver"] == "torch"
        assert res["selection"]["solver"] == "torch"
        model = load_head(path)  # skops, trusted types only
        est = model.named_steps["head"]
        assert type(est) is type(get_head(res["head"]).build(0, None))
        pred = model.predict(Xte)
        assert np.mean(pred == yte) == pytest.approx(res["metrics"]["accuracy"], abs=1e-12)


def test_auto_solver_takes_torch_from_each_devices_measured_size():
    for head in LINEAR_FAMILY:
        cpu = CPU_TORCH_MIN_CELLS[head]
        assert resolve_solver("auto", head, TORCH_MIN_CELLS // 100, 100, cuda=True) == "torch"
        assert resolve_solver("auto", head, TORCH_MIN_CELLS // 100 - 1, 100,
                              cuda=True) == "sklearn"
        assert resolve_solver("auto", head, cpu // 100, 100, cuda=False) == "torch"
        assert resolve_solver("auto", head, cpu // 100 - 1, 100, cuda=False) == "sklearn"
    # on the CPU, 20,000 x 2,048 (41M cells) is torch's for ridge and the svm, not logistic
    assert [resolve_solver("auto", h, 20_000, 2048, cuda=False) for h in LINEAR_FAMILY] \
        == ["torch", "sklearn", "torch"]
    assert resolve_solver("auto", "mlp", 10 ** 9, 100, cuda=True) == "sklearn"
    assert resolve_solver("torch", "knn", 10, 10) == "sklearn"
    assert resolve_solver("torch", "logistic", 10, 10) == "torch"
    assert resolve_solver("sklearn", "svm", 10 ** 9, 100) == "sklearn"


def test_unknown_solver_is_one_line_naming_the_option(cli, tmp_path):
    res = cli("fit-heads", tmp_path / "x.h5", "--solver", "jax")
    assert res.exit_code == 2 and "--solver" in res.output and "Traceback" not in res.output
