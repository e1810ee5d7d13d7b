"""The ``fit-heads`` run: inputs checked, tasks planned, fitted in parallel, files written.

One *run* is one (cache, feature, head); its files::

    {out}/{cache stem}/heads/{feature}__{head}.json      result, schema featx-result/1
    {out}/{cache stem}/heads/{feature}__{head}.skops     the fitted sklearn Pipeline (skops, no pickle)
    {out}/{cache stem}/heads/{feature}__{head}.test_outputs.csv   each test image's outputs
    {out}/{cache stem}/pool_sizes.png                    when 2+ pool sizes were run
    {out}/heads_summary.csv                              one row per run (merged over calls)

Only this process writes files, so a killed run leaves no worker writing behind it.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import joblib
from sklearn.pipeline import Pipeline

from featx.artifacts import (
    artifact_file,
    dump_head_model,
    file_sha256,
    load_head_model,
    sha256_key,
)
from featx.config import HeadsConfig, check_settings
from featx.data.subsets import train_subsets
from featx.errors import FeatxError
from featx.features import pool_of
from featx.files import atomic_write
from featx.head_current import current_head_result
from featx.heads.backends import check_backend, heads_backend
from featx.heads.outofcore import (
    MB,
    fit_reducer,
    memory_limit,
    reduce_rows,
)
from featx.heads.plan import open_caches, plan_tasks, repeat_caches
from featx.heads.registry import parse_heads
from featx.heads.summary import format_pool_matrix, plot_pool_summary
from featx.heads.task import (
    SUMMARY_COLUMNS,
    HeadTask,
    ImageOutputs,
    run_indexed,
    summary_row,
    task_request,
)
from featx.results import (
    head_model_path,
    image_outputs_path,
    read_result,
    write_image_outputs,
    write_json,
)

__all__ = ["HeadsConfig", "HeadsRun", "fit_heads", "load_head"]


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


def _write_run(task: HeadTask, result: dict, model: Pipeline, outputs: ImageOutputs) -> None:
    """The model and the per-image test outputs, then the result JSON with their sha256; an
    older JSON goes first, so no JSON ever sits beside files it did not describe, and a run
    killed half-way reads as not done."""
    task.out_json.unlink(missing_ok=True)
    sha = dump_head_model(model, head_model_path(task.out_json))
    result["artifacts"][sha256_key("model")] = sha
    out = write_image_outputs(image_outputs_path(task.out_json), task.cache.paths("test"),
                              outputs.y_true, outputs.y_pred, outputs.scores, task.cache.classes)
    result["artifacts"][sha256_key("test_outputs")] = file_sha256(out)
    write_json(task.out_json, result)


def _current_result(task: HeadTask) -> dict | None:
    """The result at ``task.out_json`` when it is current (:func:`current_head_result`) and
    the model file it names is there, unchanged since (its recorded sha256)."""
    res = current_head_result(task.out_json, task.cache.attrs, task_request(task))
    if res is None:
        return None
    try:
        artifact_file(task.out_json, res)
        artifact_file(task.out_json, res, "test_outputs")
    except (FeatxError, OSError):
        return None
    return res


def _write_summary(path: Path, rows: list[dict]) -> Path:
    """Merge ``rows`` into the CSV at ``path`` (keyed by ``json``), atomically."""
    old = []
    if path.exists():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
    new_keys = {r["json"] for r in rows}
    merged = [r for r in old if r.get("json") not in new_keys] + rows
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in merged:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
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

    config = _check_config(caches, config)
    limit, source = memory_limit(config.memory_limit_mb)
    prepared = open_caches(repeat_caches(caches, config, say), config, say)
    tasks, pca_groups = plan_tasks(prepared, config, limit, source, say)
    reused = _current_results(tasks, config, say)
    finished = _fit_todo(tasks, pca_groups, reused, config, limit)
    for i, task in enumerate(tasks):
        if id(task) in reused:
            finished[i] = (reused[id(task)], summary_row(reused[id(task)], task, task.plan))
        run.results.append(finished[i][0])
        run.rows.append(finished[i][1])
        run.json_paths.append(task.out_json)
    run.summary_csv = _write_summary(config.out_dir / "heads_summary.csv", run.rows)
    _compare_pool_sizes(run, prepared, tasks, reused, config)
    return run


def _check_config(caches: Sequence[str | Path], config: HeadsConfig) -> HeadsConfig:
    """``config`` with its heads parsed; a bad setting raises before anything is read."""
    heads = parse_heads(config.heads)
    config = replace(config, heads=tuple(heads), out_dir=Path(config.out_dir))
    check_settings(config)  # the rules declared beside its fields (featx/config.py)
    train_subsets(config.shots, config.train_fraction, config.draws)  # checks them
    check_backend(config.backend, config.scheduler)
    if not caches:
        raise FeatxError("give at least one cache file.")
    return config


def _current_results(tasks: list[HeadTask], config: HeadsConfig,
                     say: Callable[[str], None]) -> dict[int, dict]:
    """``id(task) -> result`` for every task whose stored result is current."""
    # a re-run reuses every result that is current: nothing is loaded, reduced or fitted
    reused = {} if config.refit else {id(t): r for t in tasks
                                      if (r := _current_result(t)) is not None}
    if reused:
        say(f"note: {len(reused)} of {len(tasks)} result(s) are current for these caches and "
            f"settings, reused without fitting (--refit fits them again).")
    return reused


def _reduce_features(pca_groups: list[list[HeadTask]], config: HeadsConfig
                     ) -> dict[int, tuple]:
    """``id(task) -> (train, val, test)`` reduced rows, one PCA per (cache, feature)."""
    arrays = {}
    for group in pca_groups:  # reduce once per (cache, feature), shared by its heads
        t = group[0]
        t0 = time.perf_counter()
        reducer = fit_reducer(t.cache, t.feature, t.plan.pca, config.standardize,
                               t.plan.block_rows)
        has_val = "val" in t.cache.splits and len(t.cache.labels("val")) > 0
        reduced = tuple(reduce_rows(reducer, t.cache, split, t.feature, t.plan.block_rows)
                        if split != "val" or has_val else None
                        for split in ("train", "val", "test"))
        reduce_s = time.perf_counter() - t0
        for task in group:
            task.reducer, task.reduce_s = reducer, reduce_s
            arrays[id(task)] = reduced  # the same array objects: sent to workers once
    return arrays


def _fit_todo(tasks: list[HeadTask], pca_groups: list[list[HeadTask]], reused: dict[int, dict],
              config: HeadsConfig, limit: int) -> dict[int, tuple[dict, dict]]:
    """Fit the tasks without a current result on the backend; ``i -> (result, row)``.

    Each result is written as soon as it exists."""
    pca_groups = [g for g in pca_groups if any(id(t) not in reused for t in g)]
    todo = [(i, t) for i, t in enumerate(tasks) if id(t) not in reused]
    arrays = _reduce_features(pca_groups, config)
    finished = {}
    if todo:
        with heads_backend(config.backend, scheduler=config.scheduler, jobs=config.jobs):
            for i, result, row, model, outputs in _dispatch(todo, arrays, config, limit):
                _write_run(tasks[i], result, model, outputs)
                finished[i] = (result, row)
    return finished


def _dispatch(todo: list[tuple[int, HeadTask]], arrays: dict[int, tuple], config: HeadsConfig,
              limit: int) -> Iterator[tuple[int, dict, dict, Pipeline, ImageOutputs]]:
    """``(i, result, row, model, outputs)`` of each task, inside the open joblib backend."""
    if config.backend == "loky":
        in_memory = [t.plan.need_mb * MB for _, t in todo if t.plan.mode == "memory"]
        outer, inner = _n_jobs(config.jobs, len(todo), limit, max(in_memory, default=1.0))
    else:  # the cluster's cores; dask sends a run's grid points back to the cluster
        outer, inner = -1, -1 if config.backend == "dask" else 1
    for _, t in todo:
        t.inner_jobs = inner
    if outer == 1:
        return (run_indexed(i, t, *arrays.get(id(t), ())) for i, t in todo)
    # results as they finish, so each is written as soon as it exists (ray's
    # multiprocessing-style backend only returns the whole list)
    return joblib.Parallel(
        n_jobs=outer, return_as="list" if config.backend == "ray" else "generator_unordered")(
        joblib.delayed(run_indexed)(i, t, *arrays.get(id(t), ())) for i, t in todo)


def _compare_pool_sizes(run: HeadsRun, prepared, tasks: list[HeadTask], reused: dict[int, dict],
                        config: HeadsConfig) -> None:
    """Where a cache ran 2+ features including a pool: its matrix and pool_sizes.png."""
    for cache, features, _, seed in prepared:
        if seed != config.seed or config.shots or config.train_fraction:
            continue  # one matrix per cache: its first seed's runs on all of train
        rows = [r for r in run.rows if r["json"].startswith(f"{cache.path.stem}/")]
        ran = {r["feature"] for r in rows}
        if len(ran) >= 2 and any(pool_of(f) is not None for f in ran):  # a pool-size comparison
            run.matrices.append(format_pool_matrix(rows, title=cache.path.name))
            png = config.out_dir / cache.path.stem / "pool_sizes.png"
            if png.is_file() and all(id(t) in reused for t in tasks if t.cache is cache):
                run.plots.append(png)  # drawn from these very results before
                continue
            run.plots.append(plot_pool_summary(
                rows, png, title=f"{cache.attrs['model']} on {cache.attrs['dataset_name']}"))


def load_head(path: str | Path) -> Pipeline:
    """The fitted pipeline of a result: ``path`` is its JSON (or the .skops itself).

    ``load_head(p).predict(X)`` takes raw cached features of shape (n_samples, n_features).
    Through the JSON, the model file must be the one it recorded (name and sha256,
    :func:`featx.artifacts.artifact_file`); either way only trusted types are built
    (:func:`featx.artifacts.load_head_model`), and nothing is unpickled.
    """
    path = Path(path)
    if path.suffix == ".json":
        path = artifact_file(path, read_result(path), missing="re-run fit-heads to write it")
    return load_head_model(path)
