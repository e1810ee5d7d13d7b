"""Choosing a head's hyperparameters on val (or CV), the refit on train, and scoring.

The selection score is balanced accuracy; grids run from the simplest setting to the most
complex, so on a tie the simplest wins.
"""
from __future__ import annotations

import time
import warnings
from typing import Iterator

import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold
from sklearn.pipeline import Pipeline

from featx.config import HeadsConfig, check_setting
from featx.errors import FeatxError
from featx.heads.batched import resolve_solver, select_and_fit_batched
from featx.heads.registry import HeadSpec, build_head, class_scores, get_head

__all__ = ["SELECTION_METRIC", "select_and_fit"]

SELECTION_METRIC = "balanced_accuracy"


def predict_blocks(model, blocks: Iterator[np.ndarray], n_classes: int):
    preds, scores = [], []
    for X in blocks:
        preds.append(model.predict(X))
        scores.append(class_scores(model, X, n_classes))
    return np.concatenate(preds).astype(int), np.concatenate(scores)


def _param_grid(spec: HeadSpec, n_fit: int) -> dict[str, list]:
    return {f"head__{k}": list(v) for k, v in spec.grid_for(n_fit).items()}


def _strip(params: dict) -> dict:
    return {k.split("__", 1)[1]: (list(v) if isinstance(v, tuple) else v)
            for k, v in params.items()}


def select_and_fit(head: str, X_train: np.ndarray, y_train: np.ndarray,
                   X_val: np.ndarray | None = None, y_val: np.ndarray | None = None, *,
                   select: str = "val", cv: int = 5, standardize: bool = True,
                   class_weight: str | None = None, seed: int = 0, n_jobs: int = 1,
                   solver: str = "sklearn", params: dict | None = None
                   ) -> tuple[Pipeline, dict, dict]:
    """Choose ``head``'s hyperparameters, then refit the chosen pipeline on train.

    Parameters
    ----------
    head : str
        A registered head name.
    X_train : ndarray of shape (n_train, n_features)
    y_train : ndarray of shape (n_train,)
        Integer class labels.
    X_val : ndarray of shape (n_val, n_features) or None
    y_val : ndarray of shape (n_val,) or None
    select : {"val", "cv"}, default "val"
        ``"val"`` scores every grid point on the val rows once (``PredefinedSplit``), which
        needs ``X_val``; ``"cv"`` uses ``StratifiedKFold(cv, shuffle=True, random_state=seed)``
        on train. The selection score is balanced accuracy.
    cv : int, default 5
    standardize : bool, default True
        ``StandardScaler`` inside the pipeline, so it is fitted on the fit rows only.
    class_weight : None or "balanced"
    seed : int, default 0
        ``random_state`` of the estimator and of the CV shuffle.
    n_jobs : int, default 1
        Grid points (and folds) fitted in parallel.
    solver : {"sklearn", "torch", "auto"}, default "sklearn"
        ``"torch"``: linear, logistic and svm fit their whole grid in one pass
        (:func:`featx.heads.batched.select_and_fit_batched`); ``"auto"``: torch from the
        device's measured size on (:func:`featx.heads.batched.resolve_solver`). Other
        heads: sklearn.
    params : dict, optional
        Estimator parameters held fixed over the grid (recorded as ``selection["fixed"]``);
        the batched trainer takes none.

    Returns
    -------
    model : Pipeline
        Fitted on ``X_train`` only, with the chosen parameters.
    selection : dict
        ``on``, ``metric``, ``chosen`` (params), ``score``, ``grid`` (``[{params, score}]``),
        ``solver`` (and ``device`` for torch).
    timings : dict
        ``select_s`` (the search) and ``fit_s`` (the refit), wall seconds.
    """
    spec = get_head(head)
    check_setting(HeadsConfig, "select", select)
    check_setting(HeadsConfig, "solver", solver)
    n_rows = len(y_train) if select == "val" else len(y_train) - -(-len(y_train) // cv)
    fixed = dict(params or {})
    if not fixed and resolve_solver(solver, head, n_rows, X_train.shape[1]) == "torch":
        return select_and_fit_batched(head, X_train, y_train, X_val, y_val, select=select,
                                      cv=cv, standardize=standardize,
                                      class_weight=class_weight, seed=seed)
    pipe = build_head(head, standardize=standardize, class_weight=class_weight, seed=seed,
                      params=fixed)
    if select == "val":
        if X_val is None or y_val is None or len(y_val) == 0:
            raise FeatxError("select='val' needs val rows (X_val, y_val); use select='cv'.")
        X = np.concatenate([X_train, X_val])
        y = np.concatenate([y_train, y_val])
        splitter = PredefinedSplit(np.r_[np.full(len(y_train), -1), np.zeros(len(y_val))])
        n_fit = len(y_train)
    else:
        X, y = X_train, y_train
        splitter = StratifiedKFold(cv, shuffle=True, random_state=seed)
        n_fit = len(y_train) - -(-len(y_train) // cv)
    search = GridSearchCV(pipe, _param_grid(spec, n_fit), scoring=SELECTION_METRIC,
                          cv=splitter, refit=False, n_jobs=n_jobs, error_score="raise")
    t0 = time.perf_counter()
    with quiet_fit_warnings():
        search.fit(X, y)
    select_s = time.perf_counter() - t0
    del X, y
    res = search.cv_results_
    grid = []
    for i, params in enumerate(res["params"]):
        point = {"params": _strip(params), "score": float(res["mean_test_score"][i])}
        if select == "cv":
            point["std"] = float(res["std_test_score"][i])
        grid.append(point)
    best = search.best_index_  # first of the best: grids run from simple to complex
    model = clone(pipe).set_params(**res["params"][best])
    t0 = time.perf_counter()
    with quiet_fit_warnings():
        model.fit(X_train, y_train)
    fit_s = time.perf_counter() - t0
    selection = {"on": select, "metric": SELECTION_METRIC, "chosen": grid[best]["params"],
                 "score": grid[best]["score"], "grid": grid, "refit": "train",
                 "solver": "sklearn"}
    if fixed:
        selection["fixed"] = fixed
    if select == "cv":
        selection["folds"] = cv
    return model, selection, {"select_s": select_s, "fit_s": fit_s}


class quiet_fit_warnings(warnings.catch_warnings):
    """Grid points that do not converge or predict one class are expected, not news."""

    def __enter__(self):
        out = super().__enter__()
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", LinAlgWarning)  # ridge at small alpha with n < d
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message=".*least populated class")
        return out
