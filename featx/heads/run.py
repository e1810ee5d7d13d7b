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
import numpy as np
from sklearn.pipeline import Pipeline

from featx.artifacts import (
    artifact_file,
    dump_head_model,
    file_sha256,
    load_head_model,
    sha256_key,
)
from featx.cache import Cache, CacheError, partial_path
from featx.config import HeadsConfig, check_settings
from featx.data.subsets import draw_train_subset, subset_record, train_subsets
from featx.errors import FeatxError, ParameterError
from featx.features import pool_of
from featx.files import atomic_write
from featx.head_current import current_head_result, select_for
from featx.heads.backends import check_backend, heads_backend
from featx.heads.outofcore import (
    MB,
    describe_plan,
    fit_reducer,
    memory_limit,
    plan_memory,
    reduce_rows,
)
from featx.heads.registry import get_head, parse_heads
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
    head_result_path,
    image_outputs_path,
    read_result,
    write_image_outputs,
    write_json,
)

__all__ = ["HeadsConfig", "HeadsRun", "fit_heads", "load_head", "open_cache",
           "resolve_features"]


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
    """Feature names to fit: ``["all"]`` -> every stored feature (penultimate, every pool{n},
    every layer's); others checked, and a name stored under another one (``pool1`` where it
    is ``penultimate``) fitted once, under the stored name."""
    names = [f.strip() for f in features if f and f.strip()]
    if not names:
        raise ParameterError("features", features, f"name at least one of "
                             f"{', '.join(cache.features)}, or all.", shown="")
    if "all" in names:
        return cache.features
    for name in names:
        cache.check_feature(name)
    return list(dict.fromkeys(cache.aliases.get(name, name) for name in names))


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
        raise FeatxError(f"{name}: the train split has a single class "
                         f"({classes[present[0]]!r}, {counts[present[0]]} rows); a head needs "
                         f"at least two classes to learn anything.")
    if select_on == "cv" and counts[present].min() < cv:
        small = classes[present[np.argmin(counts[present])]]
        raise FeatxError(f"{name}: train class {small!r} has {counts[present].min()} rows, "
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
    prepared = _open_caches(_repeat_caches(caches, config, say), config, say)
    tasks, pca_groups = _plan_tasks(prepared, config, limit, source, say)
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


def _repeat_caches(caches: Sequence[str | Path], config: HeadsConfig,
                   say: Callable[[str], None]) -> list[tuple[Path, int]]:
    """``(cache, seed)`` of every run ``config.repeats`` asks for: a cache of data featx
    split is split again (split views for its seed + 1, ..., written beside it: no
    extraction), a cache of pre-split data is fitted with seeds ``seed``, ``seed + 1``, ..."""
    from featx.cache import resplit
    out = []
    for path in caches:
        out.append((Path(path), config.seed))
        if config.repeats == 1:
            continue
        attrs = open_cache(path).attrs
        if attrs.get("split_seed") is None:
            out += [(Path(path), config.seed + r) for r in range(1, config.repeats)]
            continue
        for r in range(1, config.repeats):
            view = resplit(path, int(attrs["split_seed"]) + r)
            out.append((view.path, config.seed))
        say(f"note: {Path(path).name}: {config.repeats} repeats over split seeds "
            f"{attrs['split_seed']}..{int(attrs['split_seed']) + config.repeats - 1} "
            f"(split views of its rows, no extraction).")
    return out


def _open_caches(caches: Sequence[tuple[Path, int]], config: HeadsConfig,
                 say: Callable[[str], None]) -> list[tuple[Cache, list[str], str, int]]:
    """``(cache, features, select_on, seed)`` per cache, each checked; notes go to ``say``."""
    prepared = []
    stems = [(Path(p).stem, seed) for p, seed in caches]
    if len(set(stems)) < len(stems):
        twice = sorted({s for s, _ in stems if stems.count(s) > 1})
        raise FeatxError(f"two caches share the name {twice[0]!r}; their results would land "
                         f"in the same folder under --out. Fit them in separate runs with "
                         f"different --out folders.")
    for path, seed in caches:
        cache = open_cache(path)
        features = resolve_features(cache, config.features)
        has_val = "val" in cache.splits and len(cache.labels("val")) > 0
        select = select_for(config, has_val)
        for note in _check_labels(cache, select, config.cv):
            say(note)
        if config.select == "val" and not has_val:
            say(f"note: {cache.path.name} has no val split; choosing hyperparameters by "
                f"{config.cv}-fold stratified CV on train.")
        prepared.append((cache, features, select, seed))
    if config.class_weight == "balanced":
        for h in config.heads:
            if not get_head(h).supports_class_weight:
                say(f"note: --class-weight balanced: {h} does not support class weights; "
                    f"it is fitted unweighted.")
    return prepared


def _plan_tasks(prepared, config: HeadsConfig, limit: int, source: str,
                say: Callable[[str], None]) -> tuple[list[HeadTask], list[list[HeadTask]]]:
    """One task per (cache, feature, head), or one sgd task per streamed feature; and the
    tasks of each PCA-reduced (cache, feature), which share one reduction."""
    heads = config.heads
    tasks, pca_groups = [], []
    for cache, features, select_on, seed in prepared:
        dataset = cache.dataset_info()
        tcfg = replace(config, seed=seed)
        for subset, idx, info in _subsets(cache, tcfg, select_on):
            for feature in features:
                plan = _plan_feature(cache, feature, idx, tcfg, limit, source, select_on, say)

                def path(head: str) -> Path:
                    return head_result_path(config.out_dir, cache.path.stem, feature, head,
                                            seed=seed, subset=subset.tag if subset else None)
                if plan.mode == "stream":
                    tasks.append(HeadTask(cache, dataset, feature, "sgd", plan, select_on, tcfg,
                                          path("sgd")))
                    continue
                group = [HeadTask(cache, dataset, feature, h, plan, select_on, tcfg, path(h),
                                  subset=subset, train_idx=idx, subset_info=info)
                         for h in heads]
                if plan.mode == "pca":
                    pca_groups.append(group)
                tasks.extend(group)
    return tasks, pca_groups


def _subsets(cache: Cache, config: HeadsConfig, select_on: str) -> list[tuple]:
    """``(subset, train rows, record)`` of every labelled subset asked for; ``(None, None,
    None)`` (all of train) when none is. Shot counts a class cannot give fail here, before
    any fit."""
    subsets = train_subsets(config.shots, config.train_fraction, config.draws)
    if not subsets:
        return [(None, None, None)]
    items, out = cache.split_items("train"), []
    for subset in subsets:
        idx = draw_train_subset(items, cache.classes, subset, config.seed)
        info = subset_record(items, idx, cache.classes, subset, config.seed)
        present = [n for n in info["per_class"] if n]
        if select_on == "cv" and min(present) < config.cv:
            raise FeatxError(f"{cache.path.name} has no val split, so hyperparameters are "
                             f"chosen by {config.cv}-fold CV on train, which a subset of "
                             f"{min(present)} image(s) per class ({subset.tag}) cannot give; "
                             f"lower {{cv}} or use larger {{shots}}.")
        out.append((subset, idx, info))
    return out


def _plan_feature(cache: Cache, feature: str, idx, config: HeadsConfig, limit: int,
                  source: str, select_on: str, say: Callable[[str], None]):
    """The memory plan of one feature's fits (``idx``: the labelled subset's train rows)."""
    n_train = len(cache.labels("train")) if idx is None else len(idx)
    n_rows = n_train + (len(cache.labels("val")) if "val" in cache.splits else 0)
    dims = cache.shape("train", feature)[1]
    # the wide path's PCA runs in the pca mode's reduction, which reads whole splits: a
    # labelled subset (idx) is fitted at full width in memory
    plan = plan_memory(n_rows, dims, config.heads, limit_bytes=limit, limit_source=source,
                       pca=config.pca, wide_pca=config.wide_pca if idx is None else 0,
                       train_rows=n_train)
    if plan.mode != "memory" and idx is not None:
        raise FeatxError(f"{cache.path.name} {feature}: a labelled subset of {n_train} train "
                         f"rows does not fit in memory ({plan.need_mb:.0f} MB needed, limit "
                         f"{plan.limit_mb:.0f} MB); subsets are fitted in memory only: use "
                         f"smaller {{shots}} / {{train_fraction}} or raise "
                         f"{{memory_limit_mb}}.")
    if plan.mode != "memory":
        holdout = (f", alpha chosen on a stratified 1/{config.cv} holdout of train"
                   if select_on == "cv" else "")
        say("note: " + describe_plan(plan, config.heads, f"{cache.path.name} {feature}",
                                      holdout))
    return plan


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
