"""One run: fit, select and score one (cache, feature, head), on whichever worker runs it.

A task reads its rows from the cache file itself (or gets the PCA-reduced rows as
arguments) and returns the result, its summary row and the fitted pipeline; it writes
nothing, so only the process that started the run writes files.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import Pipeline

from featx.cache import Cache
from featx.data.subsets import TrainSubset
from featx.head_current import head_request
from featx.heads.outofcore import (WIDE_RESCALED_HEADS, MemoryPlan, fit_streaming, row_blocks,
                                   wide_inputs)
from featx.heads.registry import STREAM_GRID, get_head
from featx.heads.selection import (
    SELECTION_METRIC,
    predict_blocks,
    quiet_fit_warnings,
    select_and_fit,
)
from featx.results import (
    METRIC_COLUMNS,
    head_model_path,
    image_outputs_path,
    make_result,
    metric_cells,
    repeat_record,
)
from featx.stats import scored_metrics

if TYPE_CHECKING:
    from featx.config import HeadsConfig

__all__ = ["SUMMARY_COLUMNS", "ImageOutputs"]


@dataclass
class HeadTask:
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
    # label efficiency: the labelled train subset (featx.data.subsets), its train rows and
    # the record the result keeps; None: all of train
    subset: TrainSubset | None = None
    train_idx: np.ndarray | None = None
    subset_info: dict | None = None


@dataclass
class _Fitted:
    """A task's fitted model and the blocks it is scored on."""

    model: Pipeline             # what predicts the rows as given (reduced in pca mode)
    saved: Pipeline             # what is saved: takes raw features
    selection: dict
    fit_times: dict             # select_s, fit_s
    test_blocks: Iterator[np.ndarray]
    val_blocks: Iterator[np.ndarray] | None
    load_s: float = 0.0
    reduce_s: float = 0.0


@dataclass
class ImageOutputs:
    """Each test image's label, prediction and class scores, in the cache's test order:
    ``y_true``/``y_pred`` of shape (n,), ``scores`` of shape (n, n_classes)."""

    y_true: np.ndarray
    y_pred: np.ndarray
    scores: np.ndarray


def _run_task(task: HeadTask, X_train: np.ndarray | None = None, X_val: np.ndarray | None = None,
              X_test: np.ndarray | None = None) -> tuple[dict, dict, Pipeline, ImageOutputs]:
    """Fit, select and score one (cache, feature, head); returns (result, row, pipeline,
    test outputs).

    In pca mode the reduced rows come as arguments (joblib memmaps them for loky and
    scatters them once per call for dask, so a feature's heads share one copy); otherwise
    the rows are read from the cache here, on the worker. Nothing is written here.
    """
    cache = task.cache
    has_val = "val" in cache.splits and len(cache.labels("val")) > 0
    if task.plan.mode == "stream":
        fitted = _fit_streamed(task, has_val)
    else:
        fitted = _fit_in_memory(task, has_val, X_train, X_val, X_test)
    metrics, predict_s, outputs = _score(fitted, cache, has_val, task.config)
    timings = _timings(task, fitted, predict_s)
    head = "sgd" if task.plan.mode == "stream" else task.head
    suffix = {"memory": "", "pca": f" [pca{task.plan.pca}]",
              "stream": " [streamed]"}[task.plan.mode]
    result = make_result(
        kind="head", method=f"{head} @ {task.feature}{suffix}", model=cache.attrs["model"],
        feature=task.feature, head=head, dataset=task.dataset, metrics=metrics,
        timings=timings, settings=_settings(task, head, fitted.selection),
        selection=fitted.selection, provenance=cache.attrs,
        artifacts={"model": head_model_path(task.out_json).name,
                   "test_outputs": image_outputs_path(task.out_json).name,
                   "cache": str(cache.path)},
        repeat=repeat_record(_experiment(task, f"{head} @ {task.feature}{suffix}"),
                             split_seed=cache.attrs.get("split_seed"), seed=task.config.seed),
        train_subset=task.subset_info)
    return result, summary_row(result, task, task.plan), fitted.saved, outputs


def _experiment(task: HeadTask, method: str) -> dict:
    """What makes two head results the same experiment on another split or seed: the
    request without its seed, and the cache's features (model, weights, transform)."""
    request = {k: v for k, v in task_request(task).items() if k != "seed"}
    keys = ("model", "weights_sha256", "transform", "precision", "store_dtype", "image_size")
    return {"kind": "head", "method": method, "request": request,
            "features_from": {k: task.cache.attrs.get(k) for k in keys}}


def _fit_streamed(task: HeadTask, has_val: bool) -> _Fitted:
    """The streamed SGD head, fitted over HDF5 row blocks; scored over blocks too."""
    cache, cfg, rows = task.cache, task.config, task.plan.block_rows
    model, selection, tm = fit_streaming(
        cache, task.feature, select=task.select_on, cv=cfg.cv, standardize=cfg.standardize,
        class_weight=cfg.class_weight, seed=cfg.seed, rows=rows)
    return _Fitted(model, model, selection, tm,
                   row_blocks(cache, "test", task.feature, rows),
                   row_blocks(cache, "val", task.feature, rows) if has_val else None)


def _fit_in_memory(task: HeadTask, has_val: bool, X_train: np.ndarray | None,
                   X_val: np.ndarray | None, X_test: np.ndarray | None) -> _Fitted:
    """The head selected and refitted on rows in memory: read here, or PCA-reduced ones."""
    cache, cfg, plan = task.cache, task.config, task.plan
    t0 = time.perf_counter()
    load_s = reduce_s = 0.0
    if plan.mode == "pca":
        reduce_s = task.reduce_s
        test_blocks = iter([X_test])
    else:
        X_train = (cache.load("train", task.feature) if task.train_idx is None
                   else cache.rows("train", task.feature, task.train_idx))
        X_val = cache.load("val", task.feature) if has_val else None
        test_blocks = row_blocks(cache, "test", task.feature, plan.block_rows)
        load_s = time.perf_counter() - t0
    y_val = cache.labels("val") if has_val else None
    y_train = cache.labels("train")
    if task.train_idx is not None:
        y_train = y_train[task.train_idx]
    # the wide path's reducer standardises the raw features before its PCA; scaling the
    # components again would whiten them, giving the noise directions the weight of the
    # signal (the mlp fell to chance on 48 train rows in benchmarks/heads_scale.py)
    standardize = cfg.standardize and plan.reason != "wide"
    rescale, fixed = wide_inputs(task.head, X_train) if plan.reason == "wide" else (None, {})
    X_fit, X_sel = X_train, X_val
    if rescale is not None:
        X_fit = rescale.transform(X_train)
        X_sel = rescale.transform(X_val) if X_val is not None else None
    model, selection, tm = select_and_fit(
        task.head, X_fit, y_train, X_sel, y_val, select=task.select_on,
        cv=cfg.cv, standardize=standardize, class_weight=cfg.class_weight, seed=cfg.seed,
        n_jobs=task.inner_jobs, solver=cfg.solver, params=fixed)
    del X_train, X_fit
    if rescale is not None:  # the model takes the components as the reducer gives them
        model = Pipeline([("rescale", rescale), *model.steps])
    # the saved model takes raw features: in pca mode, the reducer's steps come first
    saved = Pipeline(task.reducer.steps + model.steps) if plan.mode == "pca" else model
    return _Fitted(model, saved, selection, tm, test_blocks,
                   iter([X_val]) if has_val else None, load_s, reduce_s)


def _score(fitted: _Fitted, cache: Cache, has_val: bool, config: HeadsConfig
           ) -> tuple[dict, float, ImageOutputs]:
    """Test (and val) metrics of the fitted model, with the selection's numbers and times,
    intervals and calibration (:func:`featx.stats.scored_metrics`); the test prediction's
    seconds; the per-image test outputs."""
    classes, y_test = cache.classes, cache.labels("test")
    model, selection = fitted.model, fitted.selection
    t1 = time.perf_counter()
    with quiet_fit_warnings():
        pred, score = predict_blocks(model, fitted.test_blocks, len(classes))
    predict_s = time.perf_counter() - t1
    with quiet_fit_warnings():
        # ECE and Brier need probabilities: a head with only a decision function (ridge,
        # linear SVM) gets none, rather than a softmax of margins posing as one
        probabilities = hasattr(model, "predict_proba")
        score = score if score.ndim == 2 else np.column_stack([-score, score])
        metrics = scored_metrics(y_test, pred, score, classes, probabilities=probabilities,
                                 n_boot=config.bootstrap, seed=config.seed)
        if has_val:
            y_val = cache.labels("val")
            val_pred = np.concatenate([model.predict(X) for X in fitted.val_blocks])
            metrics["val_accuracy"] = float(np.mean(val_pred == y_val))
            metrics["val_balanced_accuracy"] = float(balanced_accuracy_score(y_val, val_pred))
    metrics["selection_score"] = selection["score"]
    if selection["on"] == "cv":
        metrics["cv_balanced_accuracy"] = selection["score"]
    metrics["fit_s"] = fitted.fit_times["fit_s"]
    metrics["select_s"] = fitted.fit_times["select_s"]
    metrics["predict_s"] = predict_s
    return metrics, predict_s, ImageOutputs(y_test, pred, score)


def _timings(task: HeadTask, fitted: _Fitted, predict_s: float) -> dict:
    """Seconds per step, the cache's extraction included, and their total."""
    tm = fitted.fit_times
    extract_s = float((task.cache.attrs.get("timings") or {}).get("seconds") or 0.0)
    timings = {"extract_s": extract_s, "load_s": fitted.load_s, "select_s": tm["select_s"],
               "fit_s": tm["fit_s"], "predict_s": predict_s}
    if task.plan.mode == "pca":
        timings["reduce_s"] = fitted.reduce_s  # the PCA, shared by this feature's heads
    timings["total_s"] = sum(timings.values())
    return timings


def _settings(task: HeadTask, head: str, selection: dict) -> dict:
    """The result's ``settings``: what was fitted and how, and the request it answers."""
    cfg, plan, cw = task.config, task.plan, task.config.class_weight
    spec = get_head(head)
    settings = {
        "standardize": cfg.standardize,
        "class_weight": cw if spec.supports_class_weight else None,
        "class_weight_requested": cw,
        "seed": cfg.seed,
        "select": selection["on"],
        "selection_metric": SELECTION_METRIC,
        "refit": "train",
        "grid": STREAM_GRID if plan.mode == "stream" else spec.grid,
        "memory": plan.to_dict(),
        "estimator": spec.description,
        "solver": selection.get("solver", "sklearn"),
    }
    if selection["on"] in ("cv", "holdout"):
        settings["cv"] = cfg.cv
    if plan.mode == "stream":
        settings["replaces_heads"] = list(cfg.heads)
    settings["request"] = task_request(task)
    return settings


def run_indexed(i: int, task: HeadTask, *arrays
                ) -> tuple[int, dict, dict, Pipeline, ImageOutputs]:
    return (i, *_run_task(task, *arrays))


def task_request(task: HeadTask) -> dict:
    """What ``task``'s result depends on besides the cache (:func:`head_request`)."""
    streamed = task.plan.mode == "stream"
    req = head_request(task.config, head=task.head, feature=task.feature,
                       select_on=task.select_on, streamed=streamed,
                       plan=(task.plan.mode, task.plan.pca),
                       grid=STREAM_GRID if streamed else get_head(task.head).grid)
    if task.subset is not None:
        req["train_subset"] = task.subset.to_dict()
    if task.plan.reason == "wide" and task.head in WIDE_RESCALED_HEADS:
        # what the wide path feeds the mlp (wide_inputs): results from before it are refitted
        req["wide_inputs"] = "isotropic"
    return req


SUMMARY_COLUMNS = (["cache", "dataset", "model", "feature", "head", "mode", "selection",
                    "chosen"] + [n for c in METRIC_COLUMNS for n in c.names]
                   + ["val_score", "val_accuracy", "val_balanced_accuracy", "select_s", "fit_s",
                      "predict_s", "extract_s", "total_s", "json"])


def summary_row(result: dict, task: HeadTask, plan: MemoryPlan) -> dict:
    m, t = result["metrics"], result["timings"]
    mode = {"memory": "memory", "pca": f"pca{plan.pca}", "stream": "stream"}[plan.mode]
    return {
        "cache": task.cache.path.stem, "dataset": result["dataset"]["name"],
        "model": result["model"], "feature": result["feature"], "head": result["head"],
        "mode": mode, "selection": result["selection"]["on"],
        "chosen": json.dumps(result["selection"]["chosen"], sort_keys=True),
        **metric_cells(m),
        "val_score": m["selection_score"], "val_accuracy": m.get("val_accuracy"),
        "val_balanced_accuracy": m.get("val_balanced_accuracy"),
        "select_s": t["select_s"], "fit_s": t["fit_s"], "predict_s": t["predict_s"],
        "extract_s": t["extract_s"], "total_s": t["total_s"],
        "json": task.out_json.relative_to(task.config.out_dir).as_posix(),
    }
