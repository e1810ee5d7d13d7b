"""Features that do not fit in memory: the memory plan, HDF5 row blocks, PCA, streamed SGD.

A feature whose rows would not fit in memory is either reduced with an IncrementalPCA
fitted on train in row blocks (``pca=N``), or streamed: an ``SGDClassifier(log_loss)`` is
trained with ``partial_fit`` over shuffled HDF5 row blocks after a streaming
``StandardScaler.partial_fit`` pass.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from sklearn.decomposition import IncrementalPCA
from sklearn.linear_model import SGDClassifier
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from featx.cache import Cache
from featx.errors import FeatxError, ParameterError
from featx.heads.registry import STREAM_GRID, get_head
from featx.heads.selection import SELECTION_METRIC, quiet_fit_warnings

__all__ = ["STREAM_EPOCHS", "WIDE_MIN_DIMS", "WIDE_RATIO", "MemoryPlan", "is_wide",
           "memory_limit", "plan_memory"]

STREAM_EPOCHS = 5                       # passes over train per streamed SGD fit
# A feature is "wide" when it has more than WIDE_MIN_DIMS columns and more than WIDE_RATIO
# times as many columns as train rows (shufflenet pool8: 131,072 columns on 60 rows): a
# head then fits mostly noise directions, slowly (the MLP took 135 s there), and PCA to at
# most the train rows keeps the span the train rows live in (docs/heads-at-scale.md).
WIDE_MIN_DIMS = 8192
WIDE_RATIO = 4
MB = 2 ** 20


def memory_limit(limit_mb: float | None = None) -> tuple[int, str]:
    """Bytes a fit may use, and where that number came from.

    ``limit_mb`` if given, else ``$FEATX_MEMORY_LIMIT_MB``, else 80% of the memory available
    now (``MemAvailable`` of /proc/meminfo, else ``os.sysconf``), capped by a cgroup limit.
    """
    if limit_mb is not None:
        return int(float(limit_mb) * MB), f"--memory-limit-mb {limit_mb:g}"
    env = os.environ.get("FEATX_MEMORY_LIMIT_MB")
    if env:
        try:
            return int(float(env) * MB), f"FEATX_MEMORY_LIMIT_MB={env}"
        except ValueError:
            raise FeatxError(f"FEATX_MEMORY_LIMIT_MB={env!r}: give megabytes as a number, "
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
    reason: str = "memory"      # why pca: "memory" (does not fit) or "wide" (see is_wide)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "rows": self.rows, "dims": self.dims,
                "need_mb": round(self.need_mb, 2), "limit_mb": round(self.limit_mb, 2),
                "limit_source": self.limit_source, "block_rows": self.block_rows,
                "pca_components": self.pca, "reason": self.reason}


# heads whose fit depends on the inputs' overall scale, not only on their directions, and
# how the wide path feeds them (see wide_inputs)
WIDE_RESCALED_HEADS = ("mlp",)
# below this many train rows the mlp's early-stopping holdout (10%) is a handful of rows: a
# stop decided on noise (on 80 rows it scored 0.70-0.91 balanced accuracy by seed)
WIDE_MLP_EARLY_STOP_ROWS = 500


def wide_inputs(head: str, X_train: np.ndarray) -> tuple[StandardScaler | None, dict]:
    """How the wide path feeds ``head`` its PCA components: a rescaling step and estimator
    parameters, or ``(None, {})`` for heads that take the components as they are.

    The mlp gets one scale for every component, the root mean variance of the train
    components, so its inputs have unit variance on average as the standardised full-width
    features had (Glorot's initialisation then sees the width it was made for), while the
    components keep their relative sizes: whitening them gave the noise directions the
    signal's weight. With fewer than :data:`WIDE_MLP_EARLY_STOP_ROWS` train rows it trains
    without early stopping. Measured on 200 x 131,072 (BENCHMARKS.md): balanced accuracy
    0.705 as the components came, 0.951 this way, against 0.951 at full width.
    """
    if head not in WIDE_RESCALED_HEADS:
        return None, {}
    n, k = X_train.shape
    scaler = StandardScaler(with_mean=False)
    # fitted by hand: a StandardScaler whose scale_ is one number for all columns, so the
    # saved pipeline stays plain sklearn (skops, export) rather than a featx type
    var = np.asarray(X_train, np.float64).var(0)
    scaler.var_, scaler.mean_ = var, None
    scaler.scale_ = np.full(k, float(np.sqrt(var.mean())) or 1.0)
    scaler.n_samples_seen_, scaler.n_features_in_ = n, k
    return scaler, ({"early_stopping": False} if n < WIDE_MLP_EARLY_STOP_ROWS else {})


def is_wide(dims: int, train_rows: int) -> bool:
    """Whether a feature of ``dims`` columns on ``train_rows`` train rows takes the wide path:
    more than :data:`WIDE_MIN_DIMS` columns and more than :data:`WIDE_RATIO` x the rows."""
    return dims > WIDE_MIN_DIMS and dims > WIDE_RATIO * train_rows


def plan_memory(rows: int, dims: int, heads: Sequence[str], *, limit_bytes: int,
                limit_source: str = "", pca: int = 0, wide_pca: int = 0,
                train_rows: int | None = None) -> MemoryPlan:
    """Decide whether ``rows`` x ``dims`` float32 features are fitted in memory.

    A wide feature (:func:`is_wide` of ``dims`` and ``train_rows``) with ``wide_pca > 0``
    is reduced to ``min(wide_pca, train_rows - 1)`` PCA components fitted on train
    (``reason="wide"``): train's centred rows span at most ``train_rows - 1`` directions.
    Otherwise, if the estimate exceeds ``limit_bytes``: ``pca`` components (IncrementalPCA)
    when ``0 < pca < dims`` and the reduced rows fit, otherwise ``stream``.
    """
    factor = max(get_head(h).memory_factor for h in heads)
    need = rows * dims * 4 * factor
    # streaming blocks: a quarter of the limit for the block and its few working copies
    block = int(np.clip(limit_bytes / 4 / (max(dims, 1) * 4 * 4), 64, 8192))
    common = dict(rows=rows, dims=dims, need_mb=need / MB, limit_mb=limit_bytes / MB,
                  limit_source=limit_source, block_rows=block)
    if wide_pca > 0 and train_rows is not None and train_rows > 2 and is_wide(dims, train_rows):
        k = min(wide_pca, train_rows - 1)
        return MemoryPlan("pca", **{**common, "block_rows": max(block, k)}, pca=k,
                          reason="wide")
    if need <= limit_bytes:
        return MemoryPlan("memory", **common)
    if 0 < pca < dims and rows * pca * 4 * factor <= limit_bytes:
        return MemoryPlan("pca", **{**common, "block_rows": max(block, pca)}, pca=pca)
    return MemoryPlan("stream", **common)


def describe_plan(plan: MemoryPlan, heads: Sequence[str], name: str, holdout: str = ""
                   ) -> str:
    if plan.reason == "wide":
        return (f"{name}: {plan.dims:,} features on {plan.rows:,} train+val rows is wide; "
                f"reduced to {plan.pca} PCA components fitted on train only (--wide-pca "
                f"0 fits the full width), then fitting {', '.join(heads)}.")
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

def row_blocks(cache: Cache, split: str, feature: str, rows: int) -> Iterator[np.ndarray]:
    for _, X in cache.iter_rows(split, feature, rows):
        yield X


def _shuffled_blocks(cache: Cache, split: str, feature: str, index: np.ndarray, rows: int,
                     rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows_index, X)`` batches of ``index`` in random order: caches are sorted by class,
    so SGD must not see them in file order."""
    order = rng.permutation(index)
    for start in range(0, len(order), rows):
        idx = np.sort(order[start:start + rows])  # read in file order: contiguous slices
        X = cache.rows(split, feature, idx)  # a split view's rows come from its parent
        perm = rng.permutation(len(idx))
        yield idx[perm], X[perm]


# --- PCA and streaming for features that do not fit -------------------------------------------

def fit_reducer(cache: Cache, feature: str, n_components: int, standardize: bool,
                 rows: int) -> Pipeline:
    """StandardScaler (optional) then IncrementalPCA, both fitted on train in row blocks."""
    n_train, dims = cache.shape("train", feature)
    if n_components > min(n_train, dims):
        raise ParameterError("pca", n_components, f"must be at most min(train rows, feature "
                             f"width) = {min(n_train, dims)} for {cache.path.name} {feature}.")
    scaler = StandardScaler() if standardize else "passthrough"
    if standardize:
        for X in row_blocks(cache, "train", feature, rows):
            scaler.partial_fit(X)
    pca = IncrementalPCA(n_components=n_components)
    prev = None
    for X in row_blocks(cache, "train", feature, rows):
        X = scaler.transform(X) if standardize else X
        if prev is not None and len(X) < n_components:  # a short last block joins the one before
            X, prev = np.concatenate([prev, X]), None
        if prev is not None:
            pca.partial_fit(prev)
        prev = X
    pca.partial_fit(prev)
    return Pipeline([("prescale", scaler), ("pca", pca)])


def reduce_rows(reducer: Pipeline, cache: Cache, split: str, feature: str, rows: int) -> np.ndarray:
    return np.concatenate([reducer.transform(X).astype(np.float32)
                           for X in row_blocks(cache, split, feature, rows)])


def fit_streaming(cache: Cache, feature: str, *, select: str, cv: int, standardize: bool,
                   class_weight: str | None, seed: int, rows: int
                   ) -> tuple[Pipeline, dict, dict]:
    """SGDClassifier(log_loss) by partial_fit over shuffled HDF5 blocks; alpha chosen on val
    (streamed) or, without val, on one stratified holdout fold (1/cv) of train."""
    y = cache.labels("train")
    fit_rows, hold = _stream_split(y, select, cv, seed)
    weights = _class_weights(y, len(cache.classes), class_weight)
    t0 = time.perf_counter()
    scaler = _streamed_scaler(cache, feature, standardize, rows)

    def train(alpha, index):
        return _train_sgd(cache, feature, y, index, alpha=alpha, scaler=scaler,
                          weights=weights, seed=seed, rows=rows)

    grid, fitted = [], []
    with quiet_fit_warnings():
        for alpha in STREAM_GRID["alpha"]:
            clf = train(alpha, fit_rows)
            score = _holdout_score(clf, scaler, cache, feature, y, hold, rows)
            grid.append({"params": {"alpha": alpha}, "score": float(score)})
            fitted.append(clf)
    best = int(np.argmax([g["score"] for g in grid]))
    select_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if hold is None:
        clf = fitted[best]  # already fitted on exactly the train rows
    else:
        with quiet_fit_warnings():
            clf = train(grid[best]["params"]["alpha"], np.arange(len(y)))
    fit_s = time.perf_counter() - t0
    model = Pipeline([("scaler", scaler), ("head", clf)])
    selection = _stream_selection(grid, best, hold, len(y))
    return model, selection, {"select_s": select_s, "fit_s": fit_s}


def _stream_split(y: np.ndarray, select: str, cv: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """``(fit rows, holdout rows)`` of train: all rows and no holdout when selecting on val,
    else one stratified fold (1/cv) held out."""
    all_rows = np.arange(len(y))
    if select == "val":
        return all_rows, None
    return next(StratifiedKFold(cv, shuffle=True, random_state=seed).split(
        all_rows.reshape(-1, 1), y))


def _class_weights(y: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    """Each class's sample weight: ones, or sklearn's ``balanced`` for the classes present."""
    weights = np.ones(n_classes)
    if class_weight == "balanced":
        present = np.unique(y)
        weights[present] = compute_class_weight("balanced", classes=present, y=y)
    return weights


def _streamed_scaler(cache: Cache, feature: str, standardize: bool, rows: int
                     ) -> StandardScaler | str:
    """A StandardScaler partial_fit over train's blocks, or ``"passthrough"``."""
    if not standardize:
        return "passthrough"
    scaler = StandardScaler()  # on all of train: unsupervised, and the final model needs it
    for X in row_blocks(cache, "train", feature, rows):
        scaler.partial_fit(X)
    return scaler


def _scaled(scaler: StandardScaler | str, X: np.ndarray) -> np.ndarray:
    return X if isinstance(scaler, str) else scaler.transform(X)


def _train_sgd(cache: Cache, feature: str, y: np.ndarray, index: np.ndarray, *, alpha: float,
               scaler: StandardScaler | str, weights: np.ndarray, seed: int, rows: int
               ) -> SGDClassifier:
    """SGD fitted on train rows ``index``: STREAM_EPOCHS shuffled passes of partial_fit."""
    clf = SGDClassifier(loss="log_loss", alpha=alpha, random_state=seed)
    classes = np.arange(len(weights))
    for epoch in range(STREAM_EPOCHS):
        rng = np.random.default_rng([seed, epoch])
        for idx, X in _shuffled_blocks(cache, "train", feature, index, rows, rng):
            clf.partial_fit(_scaled(scaler, X), y[idx], classes=classes,
                            sample_weight=weights[y[idx]])
    return clf


def _holdout_score(clf: SGDClassifier, scaler: StandardScaler | str, cache: Cache,
                   feature: str, y: np.ndarray, hold: np.ndarray | None, rows: int) -> float:
    """Balanced accuracy on the val split (``hold`` None) or on the held-out train rows."""
    if hold is None:
        pred = np.concatenate([clf.predict(_scaled(scaler, X))
                               for X in row_blocks(cache, "val", feature, rows)])
        return balanced_accuracy_score(cache.labels("val"), pred)
    pred = np.concatenate([clf.predict(_scaled(scaler, cache.rows("train", feature,
                                                                  hold[s:s + rows])))
                           for s in range(0, len(hold), rows)])
    return balanced_accuracy_score(y[hold], pred)


def _stream_selection(grid: list[dict], best: int, hold: np.ndarray | None, n_train: int
                      ) -> dict:
    """The ``selection`` record of a streamed fit."""
    selection = {"on": "val" if hold is None else "holdout", "metric": SELECTION_METRIC,
                 "chosen": grid[best]["params"], "score": grid[best]["score"], "grid": grid,
                 "refit": "train", "epochs": STREAM_EPOCHS}
    if hold is not None:
        selection["holdout_fraction"] = round(len(hold) / n_train, 4)
    return selection
