"""Classical heads on cached features: the registry, selection on val (or CV), test scores.

One *run* is one (cache, feature, head). It loads the train (and val) rows of the feature,
chooses the head's hyperparameters on the val split (sklearn ``PredefinedSplit``) or, when
the cache has no val split, by stratified K-fold CV on train, refits the chosen pipeline on
train, scores the test split once, and writes a result JSON (the schema of
:mod:`featx.metrics`) with the fitted pipeline (joblib) beside it::

    {out}/{cache stem}/heads/{feature}__{head}.json      result, schema featx-result/1
    {out}/{cache stem}/heads/{feature}__{head}.joblib    the fitted sklearn Pipeline
    {out}/{cache stem}/pool_sizes.png                    when 2+ pool sizes were run
    {out}/heads_summary.csv                              one row per run (merged over calls)

Every head is a ``Pipeline([("scaler", StandardScaler() | "passthrough"), ("head", est)])``.
A feature whose rows would not fit in memory is either reduced with an IncrementalPCA
fitted on train in row blocks (``pca=N``), or streamed: an ``SGDClassifier(log_loss)`` is
trained with ``partial_fit`` over shuffled HDF5 row blocks after a streaming
``StandardScaler.partial_fit`` pass. Each result says which (``settings["memory"]``).

The runs, and the grid points inside each, are joblib tasks; :func:`heads_backend` points
joblib at loky processes on this machine (the default), a dask cluster or a ray cluster.
Workers read their rows from the cache file themselves and return the fitted pipeline;
only this process writes files, so a killed run leaves no worker writing behind it.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import h5py
import joblib
import numpy as np
from scipy.linalg import LinAlgWarning
from sklearn.base import BaseEstimator, clone
from sklearn.decomposition import IncrementalPCA
from sklearn.exceptions import ConvergenceWarning, UndefinedMetricWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import GridSearchCV, PredefinedSplit, StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC
from sklearn.utils.class_weight import compute_class_weight

from featx.cache import Cache, CacheError, partial_path
from featx.metrics import _jsonable, classification_metrics, make_result, write_json

__all__ = [
    "BACKENDS",
    "DEFAULT_HEADS",
    "HeadSpec",
    "HeadsConfig",
    "HeadsRun",
    "MemoryPlan",
    "build_head",
    "check_backend",
    "class_scores",
    "fit_heads",
    "format_pool_matrix",
    "format_summary",
    "get_head",
    "heads_backend",
    "list_heads",
    "load_head",
    "memory_limit",
    "open_cache",
    "parse_heads",
    "plan_memory",
    "register_head",
    "resolve_features",
    "select_and_fit",
]

DEFAULT_HEADS = ("linear", "logistic", "svm", "mlp")
BACKENDS = ("loky", "dask", "ray")      # joblib backends the fits can run on
SELECTION_METRIC = "balanced_accuracy"
STREAM_EPOCHS = 5                       # passes over train per streamed SGD fit
_STREAM_GRID = {"alpha": [1e-3, 1e-4, 1e-5]}
_MB = 2 ** 20


# --- the registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadSpec:
    """One head: how to build its estimator and which hyperparameters to search.

    ``grid`` maps estimator parameters to values, ordered from the strongest regularisation
    to the weakest: on a tie the first (simplest) setting wins. ``memory_factor`` is roughly
    how many float32 copies of the training matrix a fit holds (concatenation, fold slice,
    scaled copy, float64 conversions).
    """

    name: str
    build: Callable[[int, str | None], BaseEstimator]  # (seed, class_weight) -> estimator
    grid: dict[str, list]
    description: str
    memory_factor: float = 4.0
    supports_class_weight: bool = True


_HEADS: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add ``spec`` to the registry (a later spec with the same name replaces it)."""
    _HEADS[spec.name] = spec
    return spec


register_head(HeadSpec(
    "linear", lambda seed, cw: RidgeClassifier(class_weight=cw, random_state=seed),
    {"alpha": [1000.0, 100.0, 10.0, 1.0, 0.1]}, "RidgeClassifier (least squares, one-vs-rest)"))
register_head(HeadSpec(
    "logistic", lambda seed, cw: LogisticRegression(max_iter=1000, class_weight=cw,
                                                    random_state=seed),
    {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}, "LogisticRegression (multinomial, lbfgs)"))
register_head(HeadSpec(
    "svm", lambda seed, cw: LinearSVC(max_iter=5000, class_weight=cw, random_state=seed),
    {"C": [0.0001, 0.001, 0.01, 0.1, 1.0]}, "LinearSVC (squared hinge, one-vs-rest)",
    memory_factor=6.0))
register_head(HeadSpec(
    "mlp", lambda seed, cw: MLPClassifier(early_stopping=True, max_iter=200,
                                          n_iter_no_change=10, random_state=seed),
    {"alpha": [1e-2, 1e-4], "hidden_layer_sizes": [(128,), (512,)]},
    "MLPClassifier, one hidden ReLU layer, adam, early stopping on 10% of train",
    memory_factor=5.0, supports_class_weight=False))
register_head(HeadSpec(
    "rbf", lambda seed, cw: SVC(kernel="rbf", gamma="scale", class_weight=cw,
                                random_state=seed),
    {"C": [1.0, 10.0, 100.0]}, "SVC with RBF kernel (gamma='scale')", memory_factor=7.0))
register_head(HeadSpec(
    "knn", lambda seed, cw: KNeighborsClassifier(),
    {"n_neighbors": [15, 5, 1]}, "KNeighborsClassifier (Euclidean)",
    supports_class_weight=False))
register_head(HeadSpec(
    "sgd", lambda seed, cw: SGDClassifier(loss="log_loss", class_weight=cw, random_state=seed),
    dict(_STREAM_GRID), "SGDClassifier(log_loss), the head used when features are streamed"))


def list_heads() -> list[str]:
    """Names of the registered heads, in registration order."""
    return list(_HEADS)


def get_head(name: str) -> HeadSpec:
    """The :class:`HeadSpec` called ``name``; an unknown name lists the known ones."""
    try:
        return _HEADS[name]
    except KeyError:
        raise ValueError(f"unknown head {name!r}; available heads: "
                         f"{', '.join(list_heads())}.") from None


def parse_heads(text: str | Sequence[str]) -> list[str]:
    """``"linear,svm"`` (or a list) -> ``["linear", "svm"]``, each checked, duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(s.strip() for s in items if s and s.strip()))
    if not names:
        raise ValueError(f"--heads {text!r}: name at least one of {', '.join(list_heads())}.")
    for name in names:
        get_head(name)
    return names


def build_head(name: str, *, standardize: bool = True, class_weight: str | None = None,
               seed: int = 0, params: dict | None = None) -> Pipeline:
    """An unfitted ``Pipeline([("scaler", ...), ("head", estimator)])`` for head ``name``.

    ``class_weight`` is dropped for heads that do not support it; ``params`` are head
    parameters without the ``head__`` prefix.
    """
    spec = get_head(name)
    est = spec.build(seed, class_weight if spec.supports_class_weight else None)
    if params:
        est.set_params(**params)
    return Pipeline([("scaler", StandardScaler() if standardize else "passthrough"),
                     ("head", est)])


# --- scores, selection, refit -----------------------------------------------------------------

def class_scores(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Scores of shape (n_samples, n_classes), or (n_samples,) for a complete 2-class model.

    ``predict_proba`` when the model has it, else ``decision_function``. Classes the model
    never saw in training get probability 0 (or a decision score below every other).
    """
    seen = np.asarray(model.classes_, dtype=int)
    if hasattr(model, "predict_proba"):
        s, fill = model.predict_proba(X), 0.0
    else:
        s, fill = model.decision_function(X), None
    if s.ndim == 1:
        if len(seen) == n_classes == 2:
            return s
        s = np.column_stack([-s, s])  # binary decision: positive means classes_[1]
    if len(seen) == n_classes:
        return s
    full = np.full((len(s), n_classes), fill if fill is not None else float(s.min()) - 1.0)
    full[:, seen] = s
    return full


def _predict(model, blocks: Iterator[np.ndarray], n_classes: int):
    preds, scores = [], []
    for X in blocks:
        preds.append(model.predict(X))
        scores.append(class_scores(model, X, n_classes))
    return np.concatenate(preds).astype(int), np.concatenate(scores)


def _param_grid(spec: HeadSpec, n_fit: int) -> dict[str, list]:
    grid = {f"head__{k}": list(v) for k, v in spec.grid.items()}
    if "head__n_neighbors" in grid:  # k-NN cannot ask for more neighbours than fit rows
        grid["head__n_neighbors"] = [k for k in grid["head__n_neighbors"] if k <= n_fit] or [1]
    return grid


def _strip(params: dict) -> dict:
    return {k.split("__", 1)[1]: (list(v) if isinstance(v, tuple) else v)
            for k, v in params.items()}


def select_and_fit(head: str, X_train: np.ndarray, y_train: np.ndarray,
                   X_val: np.ndarray | None = None, y_val: np.ndarray | None = None, *,
                   select: str = "val", cv: int = 5, standardize: bool = True,
                   class_weight: str | None = None, seed: int = 0, n_jobs: int = 1
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

    Returns
    -------
    model : Pipeline
        Fitted on ``X_train`` only, with the chosen parameters.
    selection : dict
        ``on``, ``metric``, ``chosen`` (params), ``score``, ``grid`` (``[{params, score}]``).
    timings : dict
        ``select_s`` (the search) and ``fit_s`` (the refit), wall seconds.
    """
    spec = get_head(head)
    if select not in ("val", "cv"):
        raise ValueError(f"select={select!r}: use 'val' or 'cv'.")
    pipe = build_head(head, standardize=standardize, class_weight=class_weight, seed=seed)
    if select == "val":
        if X_val is None or y_val is None or len(y_val) == 0:
            raise ValueError("select='val' needs val rows (X_val, y_val); use select='cv'.")
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
    with _quiet():
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
    with _quiet():
        model.fit(X_train, y_train)
    fit_s = time.perf_counter() - t0
    selection = {"on": select, "metric": SELECTION_METRIC, "chosen": grid[best]["params"],
                 "score": grid[best]["score"], "grid": grid, "refit": "train"}
    if select == "cv":
        selection["folds"] = cv
    return model, selection, {"select_s": select_s, "fit_s": fit_s}


class _quiet(warnings.catch_warnings):
    """Grid points that do not converge or predict one class are expected, not news."""

    def __enter__(self):
        out = super().__enter__()
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", LinAlgWarning)  # ridge at small alpha with n < d
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message=".*least populated class")
        return out


# --- memory -----------------------------------------------------------------------------------

def memory_limit(limit_mb: float | None = None) -> tuple[int, str]:
    """Bytes a fit may use, and where that number came from.

    ``limit_mb`` if given, else ``$FEATX_MEMORY_LIMIT_MB``, else 80% of the memory available
    now (``MemAvailable`` of /proc/meminfo, else ``os.sysconf``), capped by a cgroup limit.
    """
    if limit_mb is not None:
        return int(float(limit_mb) * _MB), f"--memory-limit-mb {limit_mb:g}"
    env = os.environ.get("FEATX_MEMORY_LIMIT_MB")
    if env:
        try:
            return int(float(env) * _MB), f"FEATX_MEMORY_LIMIT_MB={env}"
        except ValueError:
            raise ValueError(f"FEATX_MEMORY_LIMIT_MB={env!r}: give megabytes as a number, "
                             f"e.g. 4096.") from None
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cgroup = _cgroup_room()
    if cgroup is not None:
        avail = min(avail, cgroup)
    return int(avail * 0.8), "80% of available memory"


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class MemoryPlan:
    """How one feature of one cache is fitted: ``mode`` is ``memory``, ``pca`` or ``stream``.

    ``need_mb`` estimates a fit of the train+val rows as they are (rows x dims x 4 bytes x
    the largest ``memory_factor`` of the heads); ``block_rows`` is the HDF5 read size used
    for streaming passes and test predictions.
    """

    mode: str
    rows: int
    dims: int
    need_mb: float
    limit_mb: float
    limit_source: str
    block_rows: int
    pca: int | None = None

    def to_dict(self) -> dict:
        return {"mode": self.mode, "rows": self.rows, "dims": self.dims,
                "need_mb": round(self.need_mb, 2), "limit_mb": round(self.limit_mb, 2),
                "limit_source": self.limit_source, "block_rows": self.block_rows,
                "pca_components": self.pca}


def plan_memory(rows: int, dims: int, heads: Sequence[str], *, limit_bytes: int,
                limit_source: str = "", pca: int = 0) -> MemoryPlan:
    """Decide whether ``rows`` x ``dims`` float32 features are fitted in memory.

    If the estimate exceeds ``limit_bytes``: ``pca`` components (IncrementalPCA) when
    ``0 < pca < dims`` and the reduced rows fit, otherwise ``stream``.
    """
    factor = max(get_head(h).memory_factor for h in heads)
    need = rows * dims * 4 * factor
    # streaming blocks: a quarter of the limit for the block and its few working copies
    block = int(np.clip(limit_bytes / 4 / (max(dims, 1) * 4 * 4), 64, 8192))
    common = dict(rows=rows, dims=dims, need_mb=need / _MB, limit_mb=limit_bytes / _MB,
                  limit_source=limit_source, block_rows=block)
    if need <= limit_bytes:
        return MemoryPlan("memory", **common)
    if 0 < pca < dims and rows * pca * 4 * factor <= limit_bytes:
        return MemoryPlan("pca", **{**common, "block_rows": max(block, pca)}, pca=pca)
    return MemoryPlan("stream", **common)


def _describe_plan(plan: MemoryPlan, heads: Sequence[str], name: str, holdout: str = ""
                   ) -> str:
    head = (f"{name}: ~{plan.need_mb:.1f} MB needed to fit {plan.rows} x {plan.dims} features "
            f"in memory, limit {plan.limit_mb:.1f} MB ({plan.limit_source}); ")
    if plan.mode == "pca":
        return head + (f"reduced to {plan.pca} PCA components (IncrementalPCA fitted on "
                       f"train in {plan.block_rows}-row blocks), then fitting "
                       f"{', '.join(heads)}.")
    return head + (f"streaming instead: SGDClassifier(log_loss) with partial_fit over "
                   f"shuffled {plan.block_rows}-row HDF5 blocks ({STREAM_EPOCHS} epochs"
                   f"{holdout}) replaces heads {', '.join(heads)}; pass --pca N to reduce instead.")


# --- reading rows -----------------------------------------------------------------------------

def _blocks(cache: Cache, split: str, feature: str, rows: int) -> Iterator[np.ndarray]:
    for _, X in cache.iter_rows(split, feature, rows):
        yield X


def _shuffled_blocks(cache: Cache, split: str, feature: str, index: np.ndarray, rows: int,
                     rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows_index, X)`` batches of ``index`` in random order: caches are sorted by class,
    so SGD must not see them in file order."""
    order = rng.permutation(index)
    with h5py.File(cache.path, "r") as f:
        ds = f[f"{split}/{feature}"]
        for start in range(0, len(order), rows):
            idx = np.sort(order[start:start + rows])  # h5py reads increasing indices
            X = ds[idx].astype(np.float32, copy=False)
            perm = rng.permutation(len(idx))
            yield idx[perm], X[perm]


# --- PCA and streaming for features that do not fit -------------------------------------------

def _fit_reducer(cache: Cache, feature: str, n_components: int, standardize: bool,
                 rows: int) -> Pipeline:
    """StandardScaler (optional) then IncrementalPCA, both fitted on train in row blocks."""
    n_train, dims = cache.shape("train", feature)
    if n_components > min(n_train, dims):
        raise ValueError(f"--pca {n_components}: must be at most min(train rows, feature "
                         f"width) = {min(n_train, dims)} for {cache.path.name} {feature}.")
    scaler = StandardScaler() if standardize else "passthrough"
    if standardize:
        for X in _blocks(cache, "train", feature, rows):
            scaler.partial_fit(X)
    pca = IncrementalPCA(n_components=n_components)
    prev = None
    for X in _blocks(cache, "train", feature, rows):
        X = scaler.transform(X) if standardize else X
        if prev is not None and len(X) < n_components:  # a short last block joins the one before
            X, prev = np.concatenate([prev, X]), None
        if prev is not None:
            pca.partial_fit(prev)
        prev = X
    pca.partial_fit(prev)
    return Pipeline([("prescale", scaler), ("pca", pca)])


def _reduce(reducer: Pipeline, cache: Cache, split: str, feature: str, rows: int) -> np.ndarray:
    return np.concatenate([reducer.transform(X).astype(np.float32)
                           for X in _blocks(cache, split, feature, rows)])


def _fit_streaming(cache: Cache, feature: str, *, select: str, cv: int, standardize: bool,
                   class_weight: str | None, seed: int, rows: int
                   ) -> tuple[Pipeline, dict, dict]:
    """SGDClassifier(log_loss) by partial_fit over shuffled HDF5 blocks; alpha chosen on val
    (streamed) or, without val, on one stratified holdout fold (1/cv) of train."""
    n_classes = len(cache.classes)
    classes = np.arange(n_classes)
    y = cache.labels("train")
    all_rows = np.arange(len(y))
    if select == "val":
        fit_rows, hold = all_rows, None
        y_val = cache.labels("val")
    else:
        fit_rows, hold = next(StratifiedKFold(cv, shuffle=True, random_state=seed).split(
            all_rows.reshape(-1, 1), y))
    weights = np.ones(n_classes)
    if class_weight == "balanced":
        present = np.unique(y)
        weights[present] = compute_class_weight("balanced", classes=present, y=y)

    t0 = time.perf_counter()
    scaler = StandardScaler() if standardize else "passthrough"
    if standardize:  # on all of train: unsupervised, and the final model needs it anyway
        for X in _blocks(cache, "train", feature, rows):
            scaler.partial_fit(X)

    def transform(X):
        return scaler.transform(X) if standardize else X

    def train(alpha, index):
        clf = SGDClassifier(loss="log_loss", alpha=alpha, random_state=seed)
        for epoch in range(STREAM_EPOCHS):
            rng = np.random.default_rng([seed, epoch])
            for idx, X in _shuffled_blocks(cache, "train", feature, index, rows, rng):
                clf.partial_fit(transform(X), y[idx], classes=classes,
                                sample_weight=weights[y[idx]])
        return clf

    def holdout_score(clf):
        if hold is None:
            pred = np.concatenate([clf.predict(transform(X))
                                   for X in _blocks(cache, "val", feature, rows)])
            return balanced_accuracy_score(y_val, pred)
        with h5py.File(cache.path, "r") as f:
            ds = f[f"train/{feature}"]
            pred = np.concatenate([clf.predict(transform(ds[hold[s:s + rows]].astype(np.float32)))
                                   for s in range(0, len(hold), rows)])
        return balanced_accuracy_score(y[hold], pred)

    grid, fitted = [], []
    with _quiet():
        for alpha in _STREAM_GRID["alpha"]:
            clf = train(alpha, fit_rows)
            grid.append({"params": {"alpha": alpha}, "score": float(holdout_score(clf))})
            fitted.append(clf)
    best = int(np.argmax([g["score"] for g in grid]))
    select_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if hold is None:
        clf = fitted[best]  # already fitted on exactly the train rows
    else:
        with _quiet():
            clf = train(grid[best]["params"]["alpha"], all_rows)
    fit_s = time.perf_counter() - t0
    model = Pipeline([("scaler", scaler), ("head", clf)])
    selection = {"on": "val" if hold is None else "holdout", "metric": SELECTION_METRIC,
                 "chosen": grid[best]["params"], "score": grid[best]["score"], "grid": grid,
                 "refit": "train", "epochs": STREAM_EPOCHS}
    if hold is not None:
        selection["holdout_fraction"] = round(len(hold) / len(y), 4)
    return model, selection, {"select_s": select_s, "fit_s": fit_s}


# --- where the fits run -----------------------------------------------------------------------

_OPEN_BACKENDS: list[tuple[str, str | None]] = []  # heads_backend contexts open in this process


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    """loky worker initializer: end this worker when the featx process that started it dies.

    Without it a ``kill -9`` of ``fit-heads`` leaves loky workers fitting for minutes: a
    loky worker only notices its parent is gone when it asks for its next task. Linux's
    ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL when the parent exits; it is tied to
    the parent *thread* that forked the worker, so it is only used when that is the main
    thread. A thread polling ``getppid()`` covers other systems and callers.
    """
    if os.getppid() != parent_pid:  # the parent died before this worker got here
        os._exit(1)
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent_pid:  # died between the check and prctl
            os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="featx-parent-watch", daemon=True).start()


def _import_extra(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ValueError(f"--backend {extra} needs the {extra} package: pip install "
                         f"featx[{extra}]") from None


def check_backend(backend: str, scheduler: str | None = None) -> None:
    """Refuse an unknown ``backend``, a ``scheduler`` for loky, or a missing extra, with one
    line, before any work starts (the cluster itself is reached in :func:`heads_backend`)."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    if scheduler and backend == "loky":
        raise ValueError(f"--scheduler {scheduler}: loky runs on this machine only; add "
                         f"--backend dask or --backend ray to use a cluster.")
    if backend != "loky":
        _import_extra("distributed" if backend == "dask" else "ray", backend)


@contextlib.contextmanager
def heads_backend(backend: str = "loky", *, scheduler: str | None = None,
                  jobs: int = 1) -> Iterator[str]:
    """Run the joblib calls of head fitting inside this block on ``backend``.

    Parameters
    ----------
    backend : {"loky", "dask", "ray"}, default "loky"
        ``loky``: processes on this machine that die with this process. ``dask``: a
        ``dask.distributed.Client`` for ``scheduler``, else the client already open in this
        process, else a ``LocalCluster`` of ``jobs`` single-threaded worker processes.
        ``ray``: ``ray.init(address=scheduler)``, else a local ray with ``jobs`` CPUs.
    scheduler : str or None
        Address of a running dask scheduler (``tcp://host:8786``) or ray cluster
        (``host:6379`` or ``auto``); only with dask or ray.
    jobs : int, default 1
        Size of the local cluster started when there is no ``scheduler``.

    Cluster workers open the cache files by the same path as this process, so the caches
    must be on a filesystem every worker sees. Opening the same backend again inside the
    block (``compare`` around ``fit_heads``) reuses the open one.
    """
    check_backend(backend, scheduler)
    if _OPEN_BACKENDS and _OPEN_BACKENDS[-1] == (backend, scheduler):
        yield backend
        return
    with contextlib.ExitStack() as stack:
        if backend == "loky":
            config = dict(initializer=_die_with_parent, initargs=(
                os.getpid(), threading.current_thread() is threading.main_thread()))
        elif backend == "dask":
            config = dict(client=_dask_client(stack, scheduler, jobs))
        else:
            _start_ray(stack, scheduler, jobs)
            # joblib would memmap large arguments to a local temp folder other nodes cannot
            # read; pickle them into the task instead
            config = dict(max_nbytes=None)
        stack.enter_context(joblib.parallel_config(backend=backend, **config))
        _OPEN_BACKENDS.append((backend, scheduler))
        stack.callback(_OPEN_BACKENDS.pop)
        yield backend


def _dask_client(stack: contextlib.ExitStack, scheduler: str | None, jobs: int):
    distributed = _import_extra("distributed", "dask")
    if scheduler:
        try:
            client = distributed.Client(scheduler, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ValueError(f"--scheduler {scheduler}: no dask scheduler answers there "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             f"); start one (`dask scheduler`) or leave --scheduler out for "
                             f"a local cluster.") from None
        stack.callback(client.close)
        return client
    try:
        return distributed.get_client()  # the caller's own client, e.g. in a notebook
    except ValueError:
        pass
    cluster = distributed.LocalCluster(n_workers=max(1, jobs), threads_per_worker=1,
                                       dashboard_address=None, silence_logs=logging.ERROR)
    stack.callback(cluster.close)
    client = distributed.Client(cluster, set_as_default=False)
    stack.callback(client.close)
    return client


def _start_ray(stack: contextlib.ExitStack, scheduler: str | None, jobs: int) -> None:
    ray = _import_extra("ray", "ray")
    from ray.util.joblib import register_ray
    register_ray()
    if ray.is_initialized():
        return
    if scheduler:
        try:
            ray.init(address=scheduler, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"--scheduler {scheduler}: no ray cluster answers there "
                             f"({str(exc).splitlines()[0]}); start one (`ray start --head`) "
                             f"or leave --scheduler out for a local one.") from None
    else:
        ray.init(num_cpus=max(1, jobs), include_dashboard=False, log_to_driver=False)
    stack.callback(ray.shutdown)


# --- the whole command ------------------------------------------------------------------------

@dataclass
class HeadsConfig:
    """What ``featx fit-heads`` does, independent of the CLI.

    ``features``: names, or ``("all",)`` for penultimate and every pool{n}. ``select``:
    ``"val"`` (falls back to CV when a cache has no val split) or ``"cv"``. ``jobs``: the cap
    on parallel fits (runs x grid points) with loky, the local cluster's size with dask or
    ray and no ``scheduler``. ``backend``/``scheduler``: where the fits run (see
    :func:`heads_backend`). ``pca``: components for features that do not fit (0: stream
    them instead). ``memory_limit_mb``: None = measured (see :func:`memory_limit`).
    """

    heads: tuple[str, ...] = DEFAULT_HEADS
    features: tuple[str, ...] = ("penultimate",)
    select: str = "val"
    cv: int = 5
    class_weight: str | None = None
    standardize: bool = True
    jobs: int = 1
    seed: int = 0
    out_dir: Path = Path("results")
    memory_limit_mb: float | None = None
    pca: int = 0
    backend: str = "loky"
    scheduler: str | None = None
    refit: bool = False  # fit again even where a current result exists


@dataclass
class HeadsRun:
    """What :func:`fit_heads` did: results, the summary rows and files, notes for the user."""

    results: list[dict] = field(default_factory=list)
    json_paths: list[Path] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    summary_csv: Path | None = None
    plots: list[Path] = field(default_factory=list)
    matrices: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def open_cache(path: str | Path) -> Cache:
    """:class:`Cache` for ``path``, also recognising a path whose extraction is unfinished."""
    path = Path(path)
    if not path.exists() and partial_path(path).exists():
        raise CacheError(f"{path} is not finished: only {partial_path(path).name} exists; run "
                         f"the same `featx extract` command again to complete it.")
    return Cache(path)


def resolve_features(cache: Cache, features: Sequence[str]) -> list[str]:
    """Feature names to fit: ``["all"]`` -> penultimate + every pool{n}; others checked."""
    names = [f.strip() for f in features if f and f.strip()]
    if not names:
        raise ValueError(f"--features: name at least one of {', '.join(cache.features)}, or all.")
    if "all" in names:
        return cache.features
    for name in names:
        cache.check_feature(name)
    return list(dict.fromkeys(names))


def _check_labels(cache: Cache, select_on: str, cv: int) -> list[str]:
    """Refuse caches heads cannot be fitted on; warnings for ones that only lose metrics."""
    name, classes = cache.path.name, cache.classes
    for split in ("train", "test"):
        if split not in cache.splits or len(cache.labels(split)) == 0:
            raise CacheError(f"{name} has no {split} rows; heads are fitted on train and "
                             f"scored on test, so the data needs both splits.")
    counts = np.bincount(cache.labels("train"), minlength=len(classes))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise ValueError(f"{name}: the train split has a single class "
                         f"({classes[present[0]]!r}, {counts[present[0]]} rows); a head needs "
                         f"at least two classes to learn anything.")
    if select_on == "cv" and counts[present].min() < cv:
        small = classes[present[np.argmin(counts[present])]]
        raise ValueError(f"{name}: train class {small!r} has {counts[present].min()} rows, "
                         f"fewer than --cv {cv} folds; lower --cv.")
    notes = []
    absent_train = [classes[i] for i in np.flatnonzero(counts == 0)]
    if absent_train:
        notes.append(f"warning: {name}: class(es) {', '.join(absent_train)} absent from the "
                     f"train split; heads can never predict them.")
    test_counts = np.bincount(cache.labels("test"), minlength=len(classes))
    absent_test = [classes[i] for i in np.flatnonzero(test_counts == 0)]
    if absent_test:
        notes.append(f"warning: {name}: class(es) {', '.join(absent_test)} absent from the "
                     f"test split; their recall and ROC-AUC are reported as null.")
    return notes


@dataclass
class _Task:
    cache: Cache
    dataset: dict
    feature: str
    head: str
    plan: MemoryPlan
    select_on: str
    config: HeadsConfig
    out_json: Path
    inner_jobs: int = 1
    reducer: Pipeline | None = None  # pca mode: fitted on train, shared by the feature's heads
    reduce_s: float = 0.0


def _run_task(task: _Task, X_train: np.ndarray | None = None, X_val: np.ndarray | None = None,
              X_test: np.ndarray | None = None) -> tuple[dict, dict, Pipeline]:
    """Fit, select and score one (cache, feature, head); returns (result, row, pipeline).

    In pca mode the reduced rows come as arguments (joblib memmaps them for loky and
    scatters them once per call for dask, so a feature's heads share one copy); otherwise
    the rows are read from the cache here, on the worker. Nothing is written here.
    """
    cache, cfg, plan = task.cache, task.config, task.plan
    classes = cache.classes
    has_val = "val" in cache.splits and len(cache.labels("val")) > 0
    y_train, y_test = cache.labels("train"), cache.labels("test")
    y_val = cache.labels("val") if has_val else None
    cw = cfg.class_weight
    t0 = time.perf_counter()
    load_s = reduce_s = 0.0
    if plan.mode == "stream":
        model, selection, tm = _fit_streaming(
            cache, task.feature, select=task.select_on, cv=cfg.cv, standardize=cfg.standardize,
            class_weight=cw, seed=cfg.seed, rows=plan.block_rows)
        saved = model
        test_blocks = _blocks(cache, "test", task.feature, plan.block_rows)
        val_blocks = _blocks(cache, "val", task.feature, plan.block_rows) if has_val else None
    else:
        if plan.mode == "pca":
            reducer, reduce_s = task.reducer, task.reduce_s
            test_blocks = iter([X_test])
        else:
            X_train = cache.load("train", task.feature)
            X_val = cache.load("val", task.feature) if has_val else None
            test_blocks = _blocks(cache, "test", task.feature, plan.block_rows)
            load_s = time.perf_counter() - t0
        model, selection, tm = select_and_fit(
            task.head, X_train, y_train, X_val, y_val, select=task.select_on, cv=cfg.cv,
            standardize=cfg.standardize, class_weight=cw, seed=cfg.seed, n_jobs=task.inner_jobs)
        del X_train
        # the saved model takes raw features: in pca mode, the reducer's steps come first
        saved = Pipeline(reducer.steps + model.steps) if plan.mode == "pca" else model
        val_blocks = iter([X_val]) if has_val else None
    t1 = time.perf_counter()
    with _quiet():
        pred, score = _predict(model, test_blocks, len(classes))
    predict_s = time.perf_counter() - t1
    with _quiet():
        metrics = classification_metrics(y_test, pred, score, classes)
        if has_val:
            val_pred = np.concatenate([model.predict(X) for X in val_blocks])
            metrics["val_accuracy"] = float(np.mean(val_pred == y_val))
            metrics["val_balanced_accuracy"] = float(balanced_accuracy_score(y_val, val_pred))
    metrics["selection_score"] = selection["score"]
    if selection["on"] == "cv":
        metrics["cv_balanced_accuracy"] = selection["score"]
    metrics["fit_s"] = tm["fit_s"]
    metrics["select_s"] = tm["select_s"]
    metrics["predict_s"] = predict_s

    extract_s = float((cache.attrs.get("timings") or {}).get("seconds") or 0.0)
    timings = {"extract_s": extract_s, "load_s": load_s, "select_s": tm["select_s"],
               "fit_s": tm["fit_s"], "predict_s": predict_s}
    if plan.mode == "pca":
        timings["reduce_s"] = reduce_s  # the PCA, shared by this feature's heads
    timings["total_s"] = sum(timings.values())

    head = "sgd" if plan.mode == "stream" else task.head
    spec = get_head(head)
    suffix = {"memory": "", "pca": f" [pca{plan.pca}]", "stream": " [streamed]"}[plan.mode]
    settings = {
        "standardize": cfg.standardize,
        "class_weight": cw if spec.supports_class_weight else None,
        "class_weight_requested": cw,
        "seed": cfg.seed,
        "select": selection["on"],
        "selection_metric": SELECTION_METRIC,
        "refit": "train",
        "grid": _STREAM_GRID if plan.mode == "stream" else spec.grid,
        "memory": plan.to_dict(),
        "estimator": spec.description,
    }
    if selection["on"] in ("cv", "holdout"):
        settings["cv"] = cfg.cv
    if plan.mode == "stream":
        settings["replaces_heads"] = list(cfg.heads)
    settings["request"] = _request(task)
    model_file = task.out_json.with_suffix(".joblib")
    result = make_result(
        kind="head", method=f"{head} @ {task.feature}{suffix}", model=cache.attrs["model"],
        feature=task.feature, head=head, dataset=task.dataset, metrics=metrics,
        timings=timings, settings=settings, selection=selection, provenance=cache.attrs,
        artifacts={"model": model_file.name, "cache": str(cache.path)})
    return result, _summary_row(result, task, plan), saved


def _run_indexed(i: int, task: _Task, *arrays) -> tuple[int, dict, dict, Pipeline]:
    return (i, *_run_task(task, *arrays))


def _write_run(task: _Task, result: dict, model: Pipeline) -> None:
    """The model, then its result JSON; an older JSON goes first, so no JSON ever sits
    beside a model it did not describe, and a run killed half-way reads as not done."""
    task.out_json.unlink(missing_ok=True)
    _dump_atomic(model, task.out_json.with_suffix(".joblib"))
    write_json(task.out_json, result)


def _request(task: _Task) -> dict:
    """Everything a result depends on besides the cache: an equal request on the same cache
    finds the result current (:func:`_current_result`). JSON-normalised, as stored."""
    cfg, plan = task.config, task.plan
    req = {"head": task.head, "feature": task.feature, "mode": plan.mode, "pca": plan.pca,
           "select": task.select_on, "cv": cfg.cv, "standardize": cfg.standardize,
           "class_weight": cfg.class_weight, "seed": cfg.seed,
           "heads": list(cfg.heads) if plan.mode == "stream" else [task.head],
           "grid": _STREAM_GRID if plan.mode == "stream" else get_head(task.head).grid}
    return json.loads(json.dumps(req))


def _current_result(task: _Task) -> dict | None:
    """The result at ``task.out_json`` when it was made from this very cache file (its
    provenance, creation time included) with the same request and its model is there."""
    try:
        res = json.loads(task.out_json.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or not task.out_json.with_suffix(".joblib").is_file():
        return None
    same_cache = res.get("provenance") == json.loads(json.dumps(_jsonable(task.cache.attrs)))
    same_request = (res.get("settings") or {}).get("request") == _request(task)
    return res if same_cache and same_request else None


def _dump_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    joblib.dump(obj, tmp)
    os.replace(tmp, path)


SUMMARY_COLUMNS = ["cache", "dataset", "model", "feature", "head", "mode", "selection",
                   "chosen", "test_accuracy", "test_balanced_accuracy", "test_macro_f1",
                   "test_roc_auc", "val_score", "val_accuracy", "val_balanced_accuracy",
                   "select_s", "fit_s", "predict_s", "extract_s", "total_s", "json"]


def _summary_row(result: dict, task: _Task, plan: MemoryPlan) -> dict:
    m, t = result["metrics"], result["timings"]
    mode = {"memory": "memory", "pca": f"pca{plan.pca}", "stream": "stream"}[plan.mode]
    return {
        "cache": task.cache.path.stem, "dataset": result["dataset"]["name"],
        "model": result["model"], "feature": result["feature"], "head": result["head"],
        "mode": mode, "selection": result["selection"]["on"],
        "chosen": json.dumps(result["selection"]["chosen"], sort_keys=True),
        "test_accuracy": m["accuracy"], "test_balanced_accuracy": m["balanced_accuracy"],
        "test_macro_f1": m["macro_f1"], "test_roc_auc": m["roc_auc"],
        "val_score": m["selection_score"], "val_accuracy": m.get("val_accuracy"),
        "val_balanced_accuracy": m.get("val_balanced_accuracy"),
        "select_s": t["select_s"], "fit_s": t["fit_s"], "predict_s": t["predict_s"],
        "extract_s": t["extract_s"], "total_s": t["total_s"],
        "json": task.out_json.relative_to(task.config.out_dir).as_posix(),
    }


def _write_summary(path: Path, rows: list[dict]) -> Path:
    """Merge ``rows`` into the CSV at ``path`` (keyed by ``json``), atomically."""
    old = []
    if path.exists():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    new_keys = {r["json"] for r in rows}
    merged = [r for r in old if r.get("json") not in new_keys] + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in merged:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    os.replace(tmp, path)
    return path


def _n_jobs(jobs: int, n_tasks: int, limit_bytes: int, need_bytes: float) -> tuple[int, int]:
    """(outer, inner): runs in parallel, and grid points per run, with outer x inner <= jobs
    and never more concurrent in-memory fits than the memory limit allows."""
    fits = max(1, int(limit_bytes // max(need_bytes, 1)))
    outer = max(1, min(jobs, n_tasks, fits))
    inner = max(1, min(jobs // outer, fits // outer)) if n_tasks < jobs else 1
    return outer, inner


def fit_heads(caches: Sequence[str | Path], config: HeadsConfig, *,
              log: Callable[[str], None] | None = None) -> HeadsRun:
    """Fit every head on every feature of every cache; write results, summary and plots.

    Every input is checked before any fit starts, so a bad cache, feature or head fails
    fast with one message. ``log`` receives ``note: ...`` / ``warning: ...`` lines as they
    arise (they are also in ``HeadsRun.notes``). Results do not depend on ``config.jobs``:
    every estimator gets ``random_state=config.seed``.
    """
    run = HeadsRun()

    def say(msg):
        run.notes.append(msg)
        if log is not None:
            log(msg)

    heads = parse_heads(config.heads)
    config = replace(config, heads=tuple(heads), out_dir=Path(config.out_dir))
    if config.select not in ("val", "cv"):
        raise ValueError(f"--select {config.select!r}: use val or cv.")
    if config.class_weight not in (None, "balanced"):
        raise ValueError(f"--class-weight {config.class_weight!r}: use none or balanced.")
    if config.cv < 2:
        raise ValueError(f"--cv {config.cv}: need at least 2 folds.")
    if config.jobs < 1:
        raise ValueError(f"--jobs {config.jobs}: must be at least 1.")
    check_backend(config.backend, config.scheduler)
    if not caches:
        raise ValueError("give at least one cache file.")
    limit, source = memory_limit(config.memory_limit_mb)

    prepared = []
    stems = [Path(p).stem for p in caches]
    if len(set(stems)) < len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise ValueError(f"two caches share the name {twice[0]!r}; their results would land "
                         f"in the same folder under --out. Fit them in separate runs with "
                         f"different --out folders.")
    for path in caches:
        cache = open_cache(path)
        features = resolve_features(cache, config.features)
        has_val = "val" in cache.splits and len(cache.labels("val")) > 0
        select_on = config.select if has_val else "cv"
        for note in _check_labels(cache, select_on, config.cv):
            say(note)
        if config.select == "val" and not has_val:
            say(f"note: {cache.path.name} has no val split; choosing hyperparameters by "
                f"{config.cv}-fold stratified CV on train.")
        prepared.append((cache, features, select_on))
    if config.class_weight == "balanced":
        for h in heads:
            if not get_head(h).supports_class_weight:
                say(f"note: --class-weight balanced: {h} does not support class weights; "
                    f"it is fitted unweighted.")

    tasks, pca_jobs = [], []
    for cache, features, select_on in prepared:
        dataset = cache.dataset_info()
        n_rows = sum(len(cache.labels(s)) for s in ("train", "val") if s in cache.splits)
        for feature in features:
            dims = cache.shape("train", feature)[1]
            plan = plan_memory(n_rows, dims, heads, limit_bytes=limit, limit_source=source,
                               pca=config.pca)
            if plan.mode != "memory":
                holdout = (f", alpha chosen on a stratified 1/{config.cv} holdout of train"
                           if select_on == "cv" else "")
                say("note: " + _describe_plan(plan, heads, f"{cache.path.name} {feature}",
                                              holdout))
            out = config.out_dir / cache.path.stem / "heads"
            if plan.mode == "stream":
                tasks.append(_Task(cache, dataset, feature, "sgd", plan, select_on, config,
                                   out / f"{feature}__sgd.json"))
                continue
            group = [_Task(cache, dataset, feature, h, plan, select_on, config,
                           out / f"{feature}__{h}.json") for h in heads]
            if plan.mode == "pca":
                pca_jobs.append(group)
            tasks.extend(group)

    # a re-run reuses every result that is current: nothing is loaded, reduced or fitted
    reused = {} if config.refit else {id(t): r for t in tasks
                                      if (r := _current_result(t)) is not None}
    if reused:
        say(f"note: {len(reused)} of {len(tasks)} result(s) are current for these caches and "
            f"settings, reused without fitting (--refit fits them again).")
    pca_jobs = [g for g in pca_jobs if any(id(t) not in reused for t in g)]
    todo = [(i, t) for i, t in enumerate(tasks) if id(t) not in reused]
    arrays = {id(t): () for t in tasks}
    for group in pca_jobs:  # reduce once per (cache, feature), shared by its heads
        t = group[0]
        t0 = time.perf_counter()
        reducer = _fit_reducer(t.cache, t.feature, t.plan.pca, config.standardize,
                               t.plan.block_rows)
        has_val = "val" in t.cache.splits and len(t.cache.labels("val")) > 0
        reduced = tuple(_reduce(reducer, t.cache, split, t.feature, t.plan.block_rows)
                        if split != "val" or has_val else None
                        for split in ("train", "val", "test"))
        reduce_s = time.perf_counter() - t0
        for task in group:
            task.reducer, task.reduce_s = reducer, reduce_s
            arrays[id(task)] = reduced  # the same array objects: sent to workers once

    finished = {}
    if todo:
        with heads_backend(config.backend, scheduler=config.scheduler, jobs=config.jobs):
            if config.backend == "loky":
                in_memory = [t.plan.need_mb * _MB for _, t in todo if t.plan.mode == "memory"]
                outer, inner = _n_jobs(config.jobs, len(todo), limit,
                                       max(in_memory, default=1.0))
            else:  # the cluster's cores; dask sends a run's grid points back to the cluster
                outer, inner = -1, -1 if config.backend == "dask" else 1
            for _, t in todo:
                t.inner_jobs = inner
            if outer == 1:
                done = (_run_indexed(i, t, *arrays[id(t)]) for i, t in todo)
            else:  # results as they finish, so each is written as soon as it exists (ray's
                # multiprocessing-style backend only returns the whole list)
                done = joblib.Parallel(
                    n_jobs=outer,
                    return_as="list" if config.backend == "ray" else "generator_unordered")(
                    joblib.delayed(_run_indexed)(i, t, *arrays[id(t)]) for i, t in todo)
            for i, result, row, model in done:
                _write_run(tasks[i], result, model)
                finished[i] = (result, row)
    for i, task in enumerate(tasks):
        if id(task) in reused:
            finished[i] = (reused[id(task)], _summary_row(reused[id(task)], task, task.plan))
        run.results.append(finished[i][0])
        run.rows.append(finished[i][1])
        run.json_paths.append(task.out_json)
    run.summary_csv = _write_summary(config.out_dir / "heads_summary.csv", run.rows)

    for cache, features, _ in prepared:
        rows = [r for r in run.rows if r["cache"] == cache.path.stem]
        ran = {r["feature"] for r in rows}
        if len(ran) >= 2 and any(f.startswith("pool") for f in ran):  # a pool-size comparison
            run.matrices.append(format_pool_matrix(rows, title=cache.path.name))
            png = config.out_dir / cache.path.stem / "pool_sizes.png"
            if png.is_file() and all(id(t) in reused for t in tasks if t.cache is cache):
                run.plots.append(png)  # drawn from these very results before
                continue
            from featx.plots import plot_pool_sizes
            scores: dict[str, dict[str, float]] = {}
            for r in rows:
                scores.setdefault(r["head"], {})[r["feature"]] = r["test_balanced_accuracy"]
            run.plots.append(plot_pool_sizes(
                scores, config.out_dir / cache.path.stem / "pool_sizes.png",
                title=f"{cache.attrs['model']} on {cache.attrs['dataset_name']}",
                ylabel="test balanced accuracy"))
    return run


def load_head(path: str | Path) -> Pipeline:
    """The fitted pipeline of a result: ``path`` is its JSON (or the .joblib itself).

    ``load_head(p).predict(X)`` takes raw cached features of shape (n_samples, n_features).
    """
    path = Path(path)
    if path.suffix == ".json":
        with open(path) as f:
            path = path.with_name(json.load(f)["artifacts"]["model"])
    return joblib.load(path)


# --- text output ------------------------------------------------------------------------------

def _fmt(v, digits=3) -> str:
    if v is None or v == "" or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{float(v):.{digits}f}"


def format_summary(rows: Sequence[dict]) -> str:
    """The runs as a text table, best test balanced accuracy first."""
    rows = sorted(rows, key=lambda r: -(r["test_balanced_accuracy"] or 0.0))
    header = (f"{'dataset':<14} {'model':<14} {'feature':<11} {'head':<8} {'mode':<7} "
              f"{'bal_acc':>7} {'acc':>6} {'f1':>6} {'auc':>6} {'val':>6} {'fit_s':>7}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['dataset'][:14]:<14} {r['model'][:14]:<14} {r['feature']:<11} "
                     f"{r['head']:<8} {r['mode']:<7} {_fmt(r['test_balanced_accuracy']):>7} "
                     f"{_fmt(r['test_accuracy']):>6} {_fmt(r['test_macro_f1']):>6} "
                     f"{_fmt(r['test_roc_auc']):>6} {_fmt(r['val_score']):>6} "
                     f"{_fmt(r['select_s'] + r['fit_s'], 2):>7}")
    lines.append("val: balanced accuracy of the chosen setting on val (or CV on train); "
                 "fit_s: selection + refit")
    return "\n".join(lines)


def _feature_order(name: str) -> tuple[int, int]:
    return (0, 0) if name == "penultimate" else (1, int(name[4:]) if name[4:].isdigit() else 0)


def format_pool_matrix(rows: Sequence[dict], *, title: str = "") -> str:
    """Feature (pool size) x head matrix of test balanced accuracy, val accuracy beside it
    (CV balanced accuracy when there is no val split)."""
    heads = list(dict.fromkeys(r["head"] for r in rows))
    features = sorted({r["feature"] for r in rows}, key=_feature_order)
    cell = {(r["feature"], r["head"]): r for r in rows}
    has_val = any(r.get("val_accuracy") is not None for r in rows)
    lines = [f"{title}: test balanced accuracy ({'val accuracy' if has_val else 'CV bal. acc'})"]
    lines.append(f"{'feature':<12}" + "".join(f"{h:>16}" for h in heads))
    for feat in features:
        cells = []
        for h in heads:
            r = cell.get((feat, h))
            if r is None:
                cells.append(f"{'-':>16}")
                continue
            side = r.get("val_accuracy") if has_val else r.get("val_score")
            cells.append(f"{_fmt(r['test_balanced_accuracy'])} ({_fmt(side)})".rjust(16))
        lines.append(f"{feat:<12}" + "".join(cells))
    return "\n".join(lines)
