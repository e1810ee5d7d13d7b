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
from typing import TYPE_CHECKING

import numpy as np
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import Pipeline

from featx.cache import Cache
from featx.head_current import head_request
from featx.heads.outofcore import MemoryPlan, fit_streaming, row_blocks
from featx.heads.registry import STREAM_GRID, get_head
from featx.heads.selection import (
    SELECTION_METRIC,
    predict_blocks,
    quiet_fit_warnings,
    select_and_fit,
)
from featx.metrics import classification_metrics
from featx.results import METRIC_COLUMNS, head_model_path, make_result

if TYPE_CHECKING:
    from featx.config import HeadsConfig

__all__ = ["SUMMARY_COLUMNS"]


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


def _run_task(task: HeadTask, X_train: np.ndarray | None = None, X_val: np.ndarray | None = None,
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
        model, selection, tm = fit_streaming(
            cache, task.feature, select=task.select_on, cv=cfg.cv, standardize=cfg.standardize,
            class_weight=cw, seed=cfg.seed, rows=plan.block_rows)
        saved = model
        test_blocks = row_blocks(cache, "test", task.feature, plan.block_rows)
        val_blocks = row_blocks(cache, "val", task.feature, plan.block_rows) if has_val else None
    else:
        if plan.mode == "pca":
            reducer, reduce_s = task.reducer, task.reduce_s
            test_blocks = iter([X_test])
        else:
            X_train = cache.load("train", task.feature)
            X_val = cache.load("val", task.feature) if has_val else None
            test_blocks = row_blocks(cache, "test", task.feature, plan.block_rows)
            load_s = time.perf_counter() - t0
        model, selection, tm = select_and_fit(
            task.head, X_train, y_train, X_val, y_val, select=task.select_on, cv=cfg.cv,
            standardize=cfg.standardize, class_weight=cw, seed=cfg.seed, n_jobs=task.inner_jobs)
        del X_train
        # the saved model takes raw features: in pca mode, the reducer's steps come first
        saved = Pipeline(reducer.steps + model.steps) if plan.mode == "pca" else model
        val_blocks = iter([X_val]) if has_val else None
    t1 = time.perf_counter()
    with quiet_fit_warnings():
        pred, score = predict_blocks(model, test_blocks, len(classes))
    predict_s = time.perf_counter() - t1
    with quiet_fit_warnings():
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
        "grid": STREAM_GRID if plan.mode == "stream" else spec.grid,
        "memory": plan.to_dict(),
        "estimator": spec.description,
    }
    if selection["on"] in ("cv", "holdout"):
        settings["cv"] = cfg.cv
    if plan.mode == "stream":
        settings["replaces_heads"] = list(cfg.heads)
    settings["request"] = task_request(task)
    model_file = head_model_path(task.out_json)
    result = make_result(
        kind="head", method=f"{head} @ {task.feature}{suffix}", model=cache.attrs["model"],
        feature=task.feature, head=head, dataset=task.dataset, metrics=metrics,
        timings=timings, settings=settings, selection=selection, provenance=cache.attrs,
        artifacts={"model": model_file.name, "cache": str(cache.path)})
    return result, summary_row(result, task, plan), saved


def run_indexed(i: int, task: HeadTask, *arrays) -> tuple[int, dict, dict, Pipeline]:
    return (i, *_run_task(task, *arrays))


def task_request(task: HeadTask) -> dict:
    """What ``task``'s result depends on besides the cache (:func:`head_request`)."""
    streamed = task.plan.mode == "stream"
    return head_request(task.config, head=task.head, feature=task.feature,
                        select_on=task.select_on, streamed=streamed,
                        plan=(task.plan.mode, task.plan.pca),
                        grid=STREAM_GRID if streamed else get_head(task.head).grid)


SUMMARY_COLUMNS = (["cache", "dataset", "model", "feature", "head", "mode", "selection",
                    "chosen"] + [c.name for c in METRIC_COLUMNS]
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
        **{c.name: m.get(c.key) for c in METRIC_COLUMNS},
        "val_score": m["selection_score"], "val_accuracy": m.get("val_accuracy"),
        "val_balanced_accuracy": m.get("val_balanced_accuracy"),
        "select_s": t["select_s"], "fit_s": t["fit_s"], "predict_s": t["predict_s"],
        "extract_s": t["extract_s"], "total_s": t["total_s"],
        "json": task.out_json.relative_to(task.config.out_dir).as_posix(),
    }
