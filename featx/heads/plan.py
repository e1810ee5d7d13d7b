"""What one ``fit-heads`` run fits: the caches (and the split views of ``--repeats``), each
cache's features checked against its labels, the labelled subsets of ``--shots`` /
``--train-fraction``, and each feature's memory plan (in memory, PCA-reduced, streamed or the
wide path), as the list of :class:`~featx.heads.task.HeadTask` that
:func:`featx.heads.run.fit_heads` then runs."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from featx.cache import Cache, CacheError, partial_path
from featx.config import HeadsConfig
from featx.data.subsets import draw_train_subset, subset_record, train_subsets
from featx.errors import FeatxError, ParameterError
from featx.head_current import select_for
from featx.heads.outofcore import describe_plan, plan_memory
from featx.heads.registry import get_head
from featx.heads.task import HeadTask
from featx.results import head_result_path

__all__ = ["open_cache", "open_caches", "plan_tasks", "repeat_caches", "resolve_features"]


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


def repeat_caches(caches: Sequence[str | Path], config: HeadsConfig,
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


def open_caches(caches: Sequence[tuple[Path, int]], config: HeadsConfig,
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


def plan_tasks(prepared, config: HeadsConfig, limit: int, source: str,
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
