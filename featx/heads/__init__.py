"""Classical heads on cached features: the registry, selection on val (or CV), test scores.

One *run* is one (cache, feature, head). It loads the train (and val) rows of the feature,
chooses the head's hyperparameters on the val split (sklearn ``PredefinedSplit``) or, when
the cache has no val split, by stratified K-fold CV on train, refits the chosen pipeline on
train, scores the test split once, and writes a result JSON (the schema of
:mod:`featx.results`) with the fitted pipeline (skops, :mod:`featx.artifacts`) beside it::

    {out}/{cache stem}/heads/{feature}__{head}.json      result, schema featx-result/1
    {out}/{cache stem}/heads/{feature}__{head}.skops     the fitted sklearn Pipeline
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

The package: :mod:`~featx.heads.registry` (heads and grids), :mod:`~featx.heads.selection`
(selection and refit), :mod:`~featx.heads.batched` (linear, logistic and svm over their whole
grid in one torch pass: ``solver``), :mod:`~featx.heads.outofcore` (memory plan, PCA, streamed SGD),
:mod:`~featx.heads.backends` (loky, dask, ray), :mod:`~featx.heads.task` (one run) and
:mod:`~featx.heads.run` (the whole command); whether a stored result is current is
:mod:`featx.head_current`'s answer, kept out of this package so that it imports no sklearn.
"""
from featx.config import BACKENDS, DEFAULT_HEADS, HeadsConfig
from featx.head_current import current_head_result, head_request, select_for
from featx.heads.backends import check_backend, heads_backend
from featx.heads.outofcore import STREAM_EPOCHS, MemoryPlan, memory_limit, plan_memory  # noqa: F401
from featx.heads.registry import (
                                  HeadSpec,
                                  build_head,
                                  class_scores,
                                  get_head,
                                  list_heads,
                                  parse_heads,
                                  register_head,
)
from featx.heads.plan import open_cache, resolve_features
from featx.heads.run import HeadsRun, fit_heads, load_head
from featx.heads.selection import SELECTION_METRIC, select_and_fit  # noqa: F401
from featx.heads.summary import format_pool_matrix, format_summary
from featx.heads.task import SUMMARY_COLUMNS  # noqa: F401

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
    "current_head_result",
    "fit_heads",
    "format_pool_matrix",
    "format_summary",
    "get_head",
    "head_request",
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
    "select_for",
]
