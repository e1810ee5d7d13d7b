"""The linear heads (linear, logistic, svm) fitted over their whole grid at once, with torch.

sklearn fits a grid point at a time, in float64, re-reading the training matrix for every
point (GridSearchCV), then fits the chosen point again. Here, as in THUNDER's and DINOv2's
linear evaluations, every grid point is one slice of a single ``(G, d, K)`` weight tensor:

* ``linear`` (RidgeClassifier): closed form. One eigendecomposition of the centred
  (weighted) Gram matrix, ``X^T X`` when d <= n or ``X X^T`` when d > n, then
  ``(X^T X + alpha I)^-1 X^T Y`` for every alpha is a diagonal rescaling.
* ``logistic`` (LogisticRegression, multinomial; one sigmoid for 2 classes) and ``svm``
  (LinearSVC: squared hinge, one-vs-rest, liblinear's penalised intercept): full-batch
  L-BFGS, preconditioned in the Gram matrix's eigenbasis (weights, not a rotated copy of the rows)
  shared by the whole grid, the points solved along the grid with warm starts. (Stepping
  all G points as one stacked objective ran until the weakest-penalised point converged:
  3-4x slower on the CPU, BENCHMARKS.md.)

Each objective is sklearn's own, divided by ``C * sum(sample weights)`` (the same minimiser),
so the chosen point means what it means in sklearn. Selection on val (or CV) is the
balanced accuracy of each point, the first of the best winning, exactly as
:func:`~featx.heads.selection.select_and_fit` does. The fitted head is saved as the sklearn
estimator it replaces, with ``coef_``/``intercept_``/``classes_`` set (see
:func:`_as_estimator`), behind a fitted ``StandardScaler``: predict, export and the skops
files see an ordinary pipeline.

Runs on CUDA when present (float32), else the CPU threads torch is given.
"""
from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelBinarizer, StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from featx.errors import FeatxError
from featx.heads.registry import get_head

__all__ = ["BATCHED_HEADS", "CPU_TORCH_MIN_CELLS", "TORCH_MIN_CELLS", "fit_grid", "resolve_solver",
           "select_and_fit_batched"]

BATCHED_HEADS = ("linear", "logistic", "svm")
# solver "auto" on CUDA considers torch from this many fit cells (rows x features) on: below
# it, sklearn fits a head in about a second or less, and it is the reference
TORCH_MIN_CELLS = 5_000_000
# ... and on the CPU, per head, where torch measured faster than sklearn with the grid over
# both cores (BENCHMARKS.md, "Heads at scale", 2 cores, AVX-512): svm (liblinear) loses from
# a few million cells on (> 17x at 3,500 x 2,048); linear won 1.3x at 17M cells and lost at
# 7M; logistic broke even at 29M (1.05x) and won 6.8x at 143M
CPU_TORCH_MIN_CELLS = {"linear": 15_000_000, "logistic": 50_000_000, "svm": TORCH_MIN_CELLS}
LBFGS_MAX_ITER = 300          # sklearn's LogisticRegression here: max_iter=1000
# on the largest gradient entry of the mean-scaled, preconditioned objective: sklearn's lbfgs
# stops at 1e-4 on its own (also mean-scaled) objective
LBFGS_TOL = 1e-4
# float32 sums of ~1-sized losses move by ~1e-7 from rounding alone: a step that changes the
# G summed objectives by less than this is noise, and L-BFGS stops there
LBFGS_TOL_CHANGE = 1e-6


def resolve_solver(solver: str, head: str, n_fit: int, n_features: int, *,
                   cuda: bool | None = None) -> str:
    """``"torch"`` or ``"sklearn"``: what fits ``head`` on ``n_fit`` x ``n_features`` rows.

    ``"auto"``: torch where the fit has at least :data:`TORCH_MIN_CELLS` cells with CUDA
    present (``cuda``; default: asks torch), or at least the head's
    :data:`CPU_TORCH_MIN_CELLS` on the CPU, else sklearn, the reference. Heads outside
    :data:`BATCHED_HEADS` always use sklearn (``"torch"`` asks for it where it exists).
    """
    if head not in BATCHED_HEADS:
        return "sklearn"
    if solver != "auto":
        return solver
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    floor = TORCH_MIN_CELLS if cuda else CPU_TORCH_MIN_CELLS[head]
    return "torch" if n_fit * n_features >= floor else "sklearn"


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sample_weights(y: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    """Per-row weights (n,) of sklearn's ``class_weight`` (``y`` already 0..K-1)."""
    if class_weight is None:
        return np.ones(len(y))
    w = compute_class_weight(class_weight, classes=np.arange(n_classes), y=y)
    return w[y]


def fitted_scaler(X: np.ndarray, block: int = 8192) -> StandardScaler:
    """``StandardScaler().fit(X)`` for X (n, d), from float64 moments taken in row blocks.

    The same mean, variance and near-constant rule (Chan, Golub & LeVeque's bound, as
    sklearn applies it), at a fraction of the cost: sklearn's incremental mean/variance
    took 3.3 s of a 7.8 s batched ridge fit on 70,000 x 2,048 float32 rows (BENCHMARKS.md).
    """
    n, d = X.shape
    mean = np.zeros(d)
    for a in range(0, n, block):
        mean += X[a:a + block].sum(0, dtype=np.float64)
    mean /= n
    var = np.zeros(d)
    for a in range(0, n, block):
        var += ((X[a:a + block] - mean) ** 2).sum(0)
    var /= n
    eps = np.finfo(np.float64).eps
    constant = var <= n * eps * var + (n * mean * eps) ** 2
    scaler = StandardScaler()
    scaler.mean_, scaler.var_ = mean, var
    scaler.scale_ = np.where(constant, 1.0, np.sqrt(var))
    scaler.n_samples_seen_ = n
    scaler.n_features_in_ = d
    return scaler


def _targets(y: np.ndarray, n_classes: int) -> np.ndarray:
    """+-1 one-vs-rest targets (n, K), or (n, 1) with classes_[1] positive for 2 classes,
    as RidgeClassifier and LinearSVC code them."""
    Y = -np.ones((len(y), n_classes))
    Y[np.arange(len(y)), y] = 1.0
    return Y[:, 1:] if n_classes == 2 else Y


def _ridge_grid(X, Y, sw, alphas):
    """Ridge with intercept for every alpha from one eigendecomposition.

    X (n, d), Y (n, K'), sw (n,) tensors; returns W (G, d, K') and b (G, K'), the minimisers
    of ``sum_i sw_i ||Y_i - X_i W - b||^2 + alpha ||W||^2`` (sklearn's Ridge objective).
    """
    import torch
    s = sw / sw.sum()
    xm, ym = s @ X, s @ Y
    if bool((sw == sw[0]).all()):  # unweighted: no n x d weighted copy of the rows
        Z, T = X - xm, Y - ym
    else:
        r = sw.sqrt()[:, None]
        Z, T = (X - xm) * r, (Y - ym) * r
    n, d = Z.shape
    # the decomposition in float64: eigenvalues span the features' whole spectrum, and a
    # float32 eigh loses the small ones that a weak alpha relies on
    if d <= n:
        lam, V = torch.linalg.eigh(_mm(Z.T, Z).double())
        B = V.T @ _mm(T.T, Z).T.double()                                 # (d, K')
        W = torch.stack([V @ (B / (lam.clamp(min=0) + a)[:, None]) for a in alphas])
    else:  # kernel form: W = Z^T (Z Z^T + alpha I)^-1 T
        lam, U = torch.linalg.eigh((Z @ Z.T).double())
        B = U.T @ T.double()                                          # (n, K')
        Zd = Z.double()
        W = torch.stack([Zd.T @ (U @ (B / (lam.clamp(min=0) + a)[:, None])) for a in alphas])
    W = W.to(X.dtype)
    b = ym[None, :] - torch.einsum("d,gdk->gk", xm, W)
    return W, b


def _mm(A, B):
    """``A @ B``. On the CPU through numpy's BLAS: it ran the products here (a Gram matrix
    ``X.T @ X``, which numpy turns into a half-cost SYRK, and tall-skinny ``n x d x K``
    products) about 2x faster than torch's on the same threads (BENCHMARKS.md)."""
    import torch
    if A.device.type != "cpu":
        return A @ B
    return torch.from_numpy(np.ascontiguousarray(np.matmul(A.numpy(), B.numpy())))


def _row_basis(X):
    """An orthonormal basis of the directions the rows of X (n, d) span, and ``X``'s Gram
    eigenvalues along them: V (d, r), lam (r,), with ``(X V)^T (X V) = diag(lam)``.

    From ``X^T X`` when d <= n (r = d), else from ``X X^T`` (r <= n, near-null directions
    dropped): an L2-penalised linear model started at zero never leaves the rows' span.
    """
    import torch
    n, d = X.shape
    if d <= n:
        lam, V = torch.linalg.eigh(_mm(X.T, X).double())
        return V.to(X.dtype), lam.clamp(min=0).to(X.dtype)
    lam, U = torch.linalg.eigh((X @ X.T).double())
    keep = lam > lam.max() * 1e-10
    lam, U = lam[keep], U[:, keep]
    V = (X.double().T @ U) / lam.sqrt()          # (d, r), orthonormal columns
    return V.to(X.dtype), lam.to(X.dtype)


def _objective(loss: str, X, V, Y, sw, total, reg, scale, U, b):
    """One grid point's objective (see :func:`_lbfgs_grid`) and its gradients in ``U``, ``b``.

    X (n, d) rows, V (d, r) basis, U (r, K') preconditioned weights (``W = V (scale U)``),
    b (K',) intercepts, reg ``1 / (2 C)``; returns ``(f, dU, db)``.

    By hand, not autograd: autograd's weight gradient is ``X^T @ dZ``, a transposed-A product
    that torch's MKL ran ~6x slower on CPU than the same numbers as ``(dZ^T @ X)^T``
    (0.70 s vs 0.11 s at 70,000 x 2,048 x 10). The rows stay unrotated: ``X @ (V @ Wr)``
    costs what a rotated copy would, without the copy (n x r floats) or the n x d x r product
    that makes it.
    """
    import torch
    with torch.no_grad():
        Wr = U * scale[:, None]                                                   # (r, K')
        Z = _mm(X, V @ Wr) + b                                                    # (n, K')
        sq = (Wr ** 2).sum(0)                         # (K',): ||W||^2 (V is orthonormal)
        if loss == "multinomial":
            lse = torch.logsumexp(Z, 1)
            per = lse - Z.gather(1, Y[:, None])[:, 0]
            f = (sw * per).sum() / total + reg * sq.sum() / total
            dZ = torch.exp(Z - lse[:, None])                  # softmax - one-hot, weighted
            dZ[torch.arange(len(Y), device=Z.device), Y] -= 1
            dZ *= (sw / total)[:, None]
            db = dZ.sum(0)
        elif loss == "binary":
            m = -Y * Z
            f = (sw * torch.nn.functional.softplus(m)[:, 0]).sum() / total \
                + reg * sq.sum() / total
            dZ = -Y * torch.sigmoid(m) * (sw / total)[:, None]
            db = dZ.sum(0)
        else:  # squared hinge, one-vs-rest; liblinear penalises the intercept
            m = torch.relu(1 - Y * Z)                                             # (n, K')
            f = ((sw * m ** 2).sum(0) / total).sum() + reg * ((sq + b ** 2) / total).sum()
            dZ = -2 * Y * m * sw / total
            db = dZ.sum(0) + 2 * reg * b / total
        dW = V.T @ _mm(dZ.T, X).T + (2 * reg / total) * Wr                       # (r, K')
        return f, (dW * scale[:, None]).contiguous(), db


def _lbfgs_grid(X, Y, sw, Cs, loss: str, n_out: int):
    """L-BFGS for every grid point in one basis; W (G, d, K'), b (G, K'), the evaluations.

    ``loss``: ``"multinomial"`` (Y: class index (n,)), ``"binary"`` (Y: +-1 (n, 1)) or
    ``"squared_hinge"`` (Y: +-1 (n, K'), sw (n, K') per one-vs-rest subproblem). Each
    objective is sklearn's divided by ``C * sum(sw)``: weighted mean loss +
    ``||W||^2 / (2 C sum(sw))``, the intercept penalised only for the svm (liblinear).

    Preconditioned: the weights live in the eigenbasis of the Gram matrix, each direction
    scaled by ``1 / sqrt(curvature)`` (the loss's typical curvature times the eigenvalue,
    plus the grid point's penalty), so every grid point's problem is close to the identity
    and L-BFGS needs tens of steps instead of hundreds; ``W = V (scale * U)`` maps back.
    The basis is computed once for the grid; the points are solved in grid order, each
    warm-started from the one before (a regularisation path, as sklearn's
    ``logistic_regression_path`` does).
    """
    import torch
    n, d = X.shape
    G = len(Cs)
    dev, dt = X.device, X.dtype
    V, lam = _row_basis(X)
    r = V.shape[1]
    total = sw.sum(0)                                     # () or (K',)
    tot = total if total.ndim == 0 else total.mean()
    reg = 1.0 / (2.0 * torch.as_tensor(Cs, device=dev, dtype=dt))  # (G,)
    # curvature of the mean loss along eigen-direction j ~ c * lam_j / n (c: ~1/4 for the
    # logistic losses, ~2 x the active fraction for squared hinge), plus 2 reg / sum(sw)
    c = 0.25 if loss != "squared_hinge" else 1.0
    scale = 1.0 / torch.sqrt(c * lam[None, :] / n + 2 * reg[:, None] / tot)   # (G, r)
    Ws, bs, calls = [], [], 0
    U0 = torch.zeros(r, n_out, device=dev, dtype=dt)
    b0 = torch.zeros(n_out, device=dev, dtype=dt)
    # one point at a time along the grid (strongest penalty first), each warm-started from
    # the point before it: the basis V is shared, and a point's L-BFGS stops at its
    # own tolerance instead of running until the weakest-regularised point converges
    for g in range(G):
        U = (U0 * (scale[g - 1] / scale[g])[:, None] if g else U0).clone()
        bb = b0.clone()
        opt = torch.optim.LBFGS([U, bb], lr=1, max_iter=LBFGS_MAX_ITER,
                                tolerance_grad=LBFGS_TOL, tolerance_change=LBFGS_TOL_CHANGE,
                                history_size=20, line_search_fn="strong_wolfe")
        n_calls = [0]

        def closure():
            n_calls[0] += 1
            f, gU, gb = _objective(loss, X, V, Y, sw, total, reg[g], scale[g], U, bb)
            U.grad, bb.grad = gU, gb
            return f

        opt.step(closure)
        calls += n_calls[0]
        U0, b0 = U.detach(), bb.detach()
        Ws.append(V @ (U0 * scale[g][:, None]))
        bs.append(b0)
    return torch.stack(Ws), torch.stack(bs), calls


def fit_grid(head: str, X: np.ndarray, y: np.ndarray, values: list[float], n_classes: int, *,
             class_weight: str | None = None, device=None):
    """Fit ``head`` at every grid value on standardised rows; the weights of all of them.

    Parameters
    ----------
    head : {"linear", "logistic", "svm"}
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
        Class indices 0..n_classes-1.
    values : list of float
        ``alpha`` (linear) or ``C`` (logistic, svm), one per grid point.
    n_classes : int
    class_weight : None or "balanced"
    device : torch.device, optional
        Default: CUDA when present, else the CPU.

    Returns
    -------
    W : ndarray of shape (G, n_features, K')
    b : ndarray of shape (G, K')
        K' is ``n_classes``, or 1 for two classes (the score of class 1).
    n_iter : int
        Objective evaluations (0 for the closed form).
    """
    import torch
    dev = device or _device()
    Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=dev)
    sw_np = _sample_weights(y, n_classes, class_weight)
    if head == "linear":
        W, b = _ridge_grid(Xt, torch.as_tensor(_targets(y, n_classes), device=dev,
                                               dtype=torch.float32),
                           torch.as_tensor(sw_np, device=dev, dtype=torch.float32), values)
        n_iter = 0
    elif head == "logistic":
        sw = torch.as_tensor(sw_np, device=dev, dtype=torch.float32)
        if n_classes == 2:
            Yt = torch.as_tensor(_targets(y, 2), device=dev, dtype=torch.float32)
            W, b, n_iter = _lbfgs_grid(Xt, Yt, sw, values, "binary", 1)
        else:
            Yt = torch.as_tensor(y, device=dev, dtype=torch.long)
            W, b, n_iter = _lbfgs_grid(Xt, Yt, sw, values, "multinomial", n_classes)
    elif head == "svm":
        Y = _targets(y, n_classes)
        sw2 = _svm_weights(y, n_classes, class_weight, Y.shape[1])
        W, b, n_iter = _lbfgs_grid(Xt, torch.as_tensor(Y, device=dev, dtype=torch.float32),
                                   torch.as_tensor(sw2, device=dev, dtype=torch.float32),
                                   values, "squared_hinge", Y.shape[1])
    else:
        raise FeatxError(f"head {head!r} has no batched trainer; the batched heads are "
                         f"{', '.join(BATCHED_HEADS)}.")
    return W.cpu().numpy(), b.cpu().numpy(), n_iter


def _svm_weights(y: np.ndarray, n_classes: int, class_weight: str | None,
                 n_out: int) -> np.ndarray:
    """(n, K') weights of each one-vs-rest subproblem, as liblinear gives them: with class
    weights, a subproblem's positives get their class's weight, its negatives weight 1;
    with 2 classes (one problem) every row gets its class's weight."""
    if class_weight is None:
        return np.ones((len(y), n_out))
    w = compute_class_weight(class_weight, classes=np.arange(n_classes), y=y)
    if n_classes == 2:
        return w[y][:, None]
    out = np.ones((len(y), n_classes))
    out[np.arange(len(y)), y] = w[y]
    return out


def _predict_index(X: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Predicted class indices (G, n) of every grid point."""
    S = np.einsum("nd,gdk->gnk", X, W, optimize=True) + b[:, None, :]
    if S.shape[2] == 1:
        return (S[..., 0] > 0).astype(int)
    return S.argmax(2)


def _as_estimator(head: str, W: np.ndarray, b: np.ndarray, classes: np.ndarray, value: float,
                  n_iter: int, *, seed: int, class_weight: str | None) -> BaseEstimator:
    """The sklearn estimator the head would have been, fitted: its registry build with the
    chosen parameter, and ``coef_`` (K', d), ``intercept_`` (K',), ``classes_`` set."""
    spec = get_head(head)
    est = spec.build(seed, class_weight)
    key = next(iter(spec.grid))
    est.set_params(**{key: value})
    est.coef_ = np.ascontiguousarray(W.T, dtype=np.float64)
    est.intercept_ = np.asarray(b, dtype=np.float64)
    est.n_features_in_ = W.shape[0]
    if head == "linear":
        # RidgeClassifier reads its classes and its decision rule from this binarizer
        est._label_binarizer = LabelBinarizer(pos_label=1, neg_label=-1).fit(classes)
        if W.shape[1] == 1:  # sklearn's own binary RidgeClassifier keeps coef_ of shape (d,)
            est.coef_ = est.coef_[0]
    est.classes_ = np.asarray(classes)
    if head == "logistic":
        est.n_iter_ = np.array([n_iter], dtype=np.int32)
    elif head == "svm":
        est.n_iter_ = int(n_iter)
    return est


def select_and_fit_batched(head: str, X_train: np.ndarray, y_train: np.ndarray,
                           X_val: np.ndarray | None = None, y_val: np.ndarray | None = None, *,
                           select: str = "val", cv: int = 5, standardize: bool = True,
                           class_weight: str | None = None, seed: int = 0, device=None
                           ) -> tuple[Pipeline, dict, dict]:
    """:func:`~featx.heads.selection.select_and_fit` for the linear family, with torch.

    The same arguments (``n_jobs`` aside: torch uses its own threads) and the same returns:
    a fitted ``Pipeline([("scaler", StandardScaler() | "passthrough"), ("head", est)])``
    whose ``est`` is the registry's sklearn estimator with the weights set, the selection
    (``on``, ``metric``, ``chosen``, ``score``, ``grid``, ``refit``, plus ``solver`` and
    ``device``) and the timings (``select_s``, ``fit_s``). With ``select="val"`` the grid
    is fitted on train, so the chosen point's weights are the refit on train: the same
    rows, the same objective; ``fit_s`` is the time to build the estimator from them.
    """
    from featx.heads.selection import SELECTION_METRIC
    spec = get_head(head)
    key, values = next(iter(spec.grid.items()))
    values = [float(v) for v in values]
    cw = class_weight if spec.supports_class_weight else None
    classes, yi = np.unique(y_train, return_inverse=True)
    K = len(classes)
    dev = device or _device()

    def fit_scaled(X, yy, points=values):
        # the scaler is fitted on the fit rows only, as inside sklearn's pipeline
        scaler = fitted_scaler(X) if standardize else "passthrough"
        Xs = scaler.transform(X) if standardize else X
        return (scaler, *fit_grid(head, Xs, yy, points, K, class_weight=cw, device=dev))

    t0 = time.perf_counter()
    if select == "val":
        if X_val is None or y_val is None or len(y_val) == 0:
            raise FeatxError("select='val' needs val rows (X_val, y_val); use select='cv'.")
        scaler, W, b, n_iter = fit_scaled(X_train, yi)
        Xv = scaler.transform(X_val) if standardize else X_val
        pred = classes[_predict_index(np.asarray(Xv, np.float32), W, b)]
        scores = np.array([balanced_accuracy_score(y_val, p) for p in pred])
        stds = None
    else:
        folds = StratifiedKFold(cv, shuffle=True, random_state=seed).split(X_train, y_train)
        per_fold = []
        for fit_idx, val_idx in folds:
            # the fold's classes are train's (stratified): indices stay 0..K-1
            sc, Wf, bf, _ = fit_scaled(X_train[fit_idx], yi[fit_idx])
            Xv = sc.transform(X_train[val_idx]) if standardize else X_train[val_idx]
            pred = classes[_predict_index(np.asarray(Xv, np.float32), Wf, bf)]
            per_fold.append([balanced_accuracy_score(y_train[val_idx], p) for p in pred])
        scores, stds = np.mean(per_fold, 0), np.std(per_fold, 0)
    select_s = time.perf_counter() - t0
    best = int(np.argmax(scores))  # the first of the best: grids run from simple to complex
    t0 = time.perf_counter()
    if select == "cv":  # refit the chosen point on all of train
        scaler, W, b, n_iter = fit_scaled(X_train, yi, [values[best]])
        Wb, bb = W[0], b[0]
    else:
        Wb, bb = W[best], b[best]
    est = _as_estimator(head, Wb, bb, classes, values[best], n_iter, seed=seed,
                        class_weight=cw)
    model = Pipeline([("scaler", scaler), ("head", est)])
    fit_s = time.perf_counter() - t0
    grid = []
    for i, v in enumerate(values):
        point = {"params": {key: v}, "score": float(scores[i])}
        if stds is not None:
            point["std"] = float(stds[i])
        grid.append(point)
    selection = {"on": select, "metric": SELECTION_METRIC, "chosen": grid[best]["params"],
                 "score": grid[best]["score"], "grid": grid, "refit": "train",
                 "solver": "torch", "device": str(dev)}
    if select == "cv":
        selection["folds"] = cv
    return model, selection, {"select_s": select_s, "fit_s": fit_s}
