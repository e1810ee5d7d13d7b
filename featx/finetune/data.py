"""The images one fine-tuning run trains, validates and scores on: a cache's split or a dataset's.

Either way the files are the heads' very split, with the undecodable ones left out as
extraction leaves them out, so a run's dataset fingerprints equal those of the cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from featx.data import DataError, DatasetSpec, dataset_fingerprints
from featx.data.images import ImageFiles
from featx.runtime import cap_workers, finetune_workers

__all__ = ["FinetuneData", "data_from_cache", "data_from_spec", "repeat_sources",
           "subset_data"]


@dataclass
class FinetuneData:
    """The images one run trains, validates and scores on.

    ``splits`` holds the readable files only, ``{split: [(relpath, label), ...]}`` relative to
    ``root``; ``info`` is the ``dataset`` record of the result (same fingerprints as
    :meth:`featx.cache.Cache.dataset_info` for the same files); ``skipped`` lists
    ``(split, relpath, reason)`` of files left out because they cannot be decoded;
    ``source`` says where the split came from (``--data PATH`` or ``--split-from CACHE``),
    ``cache`` is that cache file, if any.
    """

    name: str
    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    info: dict
    source: str
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    cache: Path | None = None


def data_from_cache(path: str | Path, *, allow_missing: bool = False) -> FinetuneData:
    """The exact train/val/test files a cache was extracted from (its readable rows).

    Files of the cache that are no longer in place are refused, naming them; with
    ``allow_missing`` the run goes on without them and its result records the fingerprints
    of the files it really used, so ``report`` lists it as not comparable.
    """
    from featx.cache import Cache
    cache = Cache(path)
    root = Path(cache.attrs["dataset_root"])
    if not root.is_dir():
        raise DataError(f"--split-from {path}: the images it was extracted from were in {root}, "
                        f"which no longer exists. Put them back there, or use {{data_path}} with "
                        f"their new location (same files give the same split).")
    splits = {s: cache.split_items(s) for s in cache.splits}
    info = cache.dataset_info()
    missing = [f"{s}/{rel}" for s, items in splits.items() for rel, _ in items
               if not (root / rel).is_file()]
    if missing and not allow_missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise DataError(f"--split-from {path}: {len(missing)} of its images are no longer in "
                        f"{root} ({shown}). Put them back, re-extract, or pass {{allow_missing}} "
                        f"to fine-tune without them (the result is then not comparable).")
    if missing:
        splits = {s: [(rel, lab) for rel, lab in items if (root / rel).is_file()]
                  for s, items in splits.items()}
        info = {**info, **dataset_fingerprints(splits), "missing_files": len(missing)}
    return FinetuneData(info["name"], root, cache.classes, splits, info, f"--split-from {path}",
                        cache.skipped(), Path(path))


def repeat_sources(source: str | Path, repeats: int, seed: int, *, split_seed: int = 0,
                   split_fractions: str = "0.7,0.15,0.15", from_cache: bool) -> list:
    """``(split source, seed)`` of each of ``repeats`` runs.

    ``from_cache``: ``source`` is a cache; data featx split gets split views for its split
    seed + 1, ... (:func:`featx.cache.resplit`, written beside it), pre-split data the seeds
    ``seed``, ``seed + 1``, ... . Otherwise ``source`` is a ``--data`` path and the sources
    are ``(path, split seed)``: split seeds ``split_seed``, ``split_seed + 1``, ..., or seeds
    for pre-split data.
    """
    from featx.cache import Cache, resplit
    from featx.data import load_dataset, parse_split_fractions
    if from_cache:
        if repeats == 1:
            return [(source, seed)]
        base = Cache(source).attrs.get("split_seed")
        if base is None:
            return [(source, seed + r) for r in range(repeats)]
        return [(source, seed)] + [(resplit(source, int(base) + r).path, seed)
                                   for r in range(1, repeats)]
    if repeats == 1:
        return [((source, split_seed), seed)]
    spec = load_dataset(source, split=parse_split_fractions(split_fractions), seed=split_seed)
    if spec.seed is None:
        return [((source, split_seed), seed + r) for r in range(repeats)]
    return [((source, split_seed + r), seed) for r in range(repeats)]


def subset_data(data: FinetuneData, subset, seed: int) -> FinetuneData:
    """``data`` with its train split cut to the labelled ``subset``
    (:class:`~featx.data.subsets.TrainSubset`) drawn with ``seed``: the very images
    ``fit-heads --shots/--train-fraction`` draws from the same files. Val and test stay;
    ``info`` keeps the full split's fingerprints (the same test set as the heads) and adds
    ``train_subset`` (:func:`~featx.data.subsets.subset_record`)."""
    from featx.data.subsets import draw_train_subset, subset_record
    items = data.splits["train"]
    idx = draw_train_subset(items, data.classes, subset, seed)
    info = {**data.info, "train_subset": subset_record(items, idx, data.classes, subset, seed)}
    return replace(data, splits={**data.splits, "train": [items[i] for i in idx]}, info=info)


def _no_transform(img):
    return torch.zeros(3, 1, 1)  # decoding is the check; the pixels are not needed


def _decode_errors(root: Path, items: list[tuple[str, int]], workers: int) -> list[str]:
    ds = ImageFiles(root, items, _no_transform, crop=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers)
    errors = [""] * len(items)
    for _, _, idx, errs in loader:
        for i, e in zip(idx.tolist(), errs):
            errors[i] = e
    return errors


def data_from_spec(spec: DatasetSpec, *, workers: int | None = None) -> FinetuneData:
    """``spec``'s split with undecodable files left out, as extraction leaves them out.

    Every file is decoded once up front (``workers`` processes, default one per CPU core up
    to 8), so the fingerprints of the result equal those of a cache extracted from the same
    data, and training never meets a bad file.
    """
    workers = cap_workers(finetune_workers() if workers is None else workers)[0]
    readable, skipped = {}, []
    for split, items in spec.splits.items():
        errors = _decode_errors(spec.root, items, workers)
        readable[split] = [it for it, e in zip(items, errors) if not e]
        skipped += [(split, it[0], e) for it, e in zip(items, errors) if e]
    info = {"name": spec.name, "root": str(Path(spec.root).resolve()),
            "classes": list(spec.classes), "fingerprint": spec.fingerprint(),
            "split_seed": spec.seed, **dataset_fingerprints(readable)}
    return FinetuneData(spec.name, Path(spec.root), list(spec.classes), readable, info,
                        f"--data {spec.root}", skipped)
