"""Split views: another split of a cache's rows, written as a small file that copies no feature.

An image's features do not depend on the split it lands in, so scoring a setting on another
split (``--split-seed S``, a repeat) needs no new forward pass: :func:`resplit` cuts the
cache's files again, exactly as ``featx extract --split-seed S`` would, and writes a *split
view* beside it, under the very name that command would give its cache
(``NAME_split{S}.h5``). The view holds the new file lists, labels and paths, and for every
row the parent split and row it comes from; :class:`~featx.cache.Cache` reads its features
from the parent through that index. Everything that takes a cache takes a view
(``fit-heads``, ``finetune --split-from``, ``info``), and ``extract --split-seed S`` finds it
up to date.

Layout of a view (schema :data:`~featx.cache.layout.SCHEMA_VERSION`)::

    /                          attrs: the parent's, with split_seed, dataset_fingerprint and
                               created of the new split, and split_view (below)
    /{split}/labels, paths     as in a cache
    /{split}/source_split      (n,) uint8, index into split_view["parent_splits"]
    /{split}/source_row        (n,) int64, row of that split in the parent
    /split/{split}/..., /skipped/...   as in a cache

``split_view`` records the parent's file name (relative to the view's folder), its
``created`` and ``dataset_fingerprint``: a parent extracted again makes the view refuse to
open (run ``featx resplit`` again) rather than serve other rows.

Why a view file and not the split applied at read time with a ``--split-seed`` on every
command: the split is part of the data (DESIGN.md), and a view is a cache like any other,
so no command needs a new option, results land in their own folder (named after the view),
and ``report`` groups them by their fingerprints as it does every other split. Why not h5py
external links or virtual datasets: a link maps whole datasets, and a virtual dataset maps
hyperslabs, so a shuffled split would need one mapping per row.
"""
from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from featx.cache.layout import (
    CacheError,
    StaleCacheError,
    encode_attr,
    provenance_covers,
)
from featx.cache.writer import lock_cache
from featx.data import SPLITS, DatasetSpec, check_seed, split_per_class
from featx.files import atomic_write

__all__ = ["VIEW_ATTR", "ResplitResult", "resplit", "resplit_items", "view_parent",
           "view_path"]

VIEW_ATTR = "split_view"
_STR = h5py.string_dtype("utf-8")
# layouts featx splits itself; the others (train/val/test folders, a CSV split column) bring
# their split with the data
_SPLIT_BY_FEATX = ("folders", "csv")


@dataclass
class ResplitResult:
    """What :func:`resplit` did: the view's ``path`` and ``status`` (``"written"`` or
    ``"up-to-date"``), and the split's counts."""

    path: Path
    status: str
    counts: dict


def view_path(parent: str | Path, attrs: dict, split_seed: int,
              out_dir: str | Path | None = None) -> Path:
    """Where the view of ``parent`` for ``split_seed`` goes: the name ``featx extract
    --split-seed`` gives that split's cache (``_split{S}``, nothing for 0)."""
    parent = Path(parent)
    stem = parent.stem
    old = attrs.get("split_seed")
    if old:  # the parent's own seed suffix is replaced, not stacked
        stem = re.sub(rf"_split{int(old)}$", "", stem)
    name = f"{stem}_split{split_seed}.h5" if split_seed else f"{stem}.h5"
    return Path(out_dir if out_dir is not None else parent.parent) / name


def resplit_items(attrs: dict, full: dict[str, list[tuple[str, int]]], split_seed: int
                  ) -> dict[str, list[tuple[str, int]]]:
    """The split ``featx extract --split-seed split_seed`` makes of the files in ``full``.

    ``full`` is a cache's ``/split/{split}`` lists (every file, undecodable ones included);
    the files of each class are put back in the order the layout lists them (folders: by
    path components, as ``pathlib`` sorts; a CSV: by path text) and cut by
    :func:`~featx.data.split_per_class` with the cache's fractions.
    """
    layout = attrs.get("dataset_layout")
    if attrs.get("split_seed") is None or layout not in _SPLIT_BY_FEATX:
        raise CacheError(
            f"{attrs.get('dataset_name')}: the data came split (layout {layout}: train/val/test "
            f"folders or a CSV split column), so its split is part of the data and cannot be "
            f"drawn again with another {{split_seed}}; repeat over {{seed}} instead.")
    by_class: dict[int, list[str]] = defaultdict(list)
    for items in full.values():
        for rel, label in items:
            by_class[int(label)].append(rel)
    key = PurePosixPath if layout == "folders" else str
    by_class = {lab: sorted(files, key=key) for lab, files in sorted(by_class.items())}
    return split_per_class(by_class, list(attrs["classes"]),
                           tuple(attrs["split_fractions"]), split_seed,
                           Path(attrs["dataset_root"]))


def _read_lists(f: h5py.File) -> tuple[dict, dict, list]:
    """The full lists, the rows ``{path: (split index, row)}``, and the skipped files."""
    full = {s: list(zip(f[f"split/{s}/paths"].asstr()[:], f[f"split/{s}/labels"][:].tolist()))
            for s in SPLITS if f"split/{s}" in f}
    rows = {}
    splits = [s for s in SPLITS if s in f]
    for i, s in enumerate(splits):
        for r, p in enumerate(f[f"{s}/paths"].asstr()[:]):
            rows[p] = (i, r)
    sk = f["skipped"]
    skipped = list(zip(sk["split"].asstr()[:], sk["path"].asstr()[:], sk["reason"].asstr()[:]))
    return full, rows, skipped


def resplit(cache: str | Path, split_seed: int, *, out_dir: str | Path | None = None,
            overwrite: bool = False) -> ResplitResult:
    """Write the split view of ``cache`` for ``split_seed``; no feature is read or copied.

    Parameters
    ----------
    cache : str or Path
        A complete cache of data that featx split (class folders, a CSV without a split
        column), or a view of one (its parent is used).
    split_seed : int
        Seed of the new split, 0..4294967295.
    out_dir : str or Path, optional
        Folder of the view [default: the cache's].
    overwrite : bool, default False
        Replace a real cache of other inputs that has the view's name (another view there is
        always replaced: it holds no features).
    """
    from featx.cache.reader import Cache
    split_seed = check_seed(split_seed, "split_seed")
    parent = Cache(cache)
    if parent.is_view:  # a view of a view reads from the first cache
        parent = parent.parent
    pa = parent.attrs
    with h5py.File(parent.path, "r") as f:
        full, rows, skipped = _read_lists(f)
        parent_splits = [s for s in SPLITS if s in f]
    splits = resplit_items(pa, full, split_seed)
    root = Path(pa["dataset_root"])
    spec = DatasetSpec(root, pa["dataset_name"], list(pa["classes"]), splits,
                       pa["dataset_layout"], split_seed, tuple(pa["split_fractions"]))
    target = view_path(parent.path, pa, split_seed, out_dir)
    if target.resolve() == parent.path.resolve():
        return ResplitResult(parent.path, "up-to-date", spec.counts())
    attrs = {k: v for k, v in pa.items() if k not in ("complete", VIEW_ATTR)}
    attrs.update(split_seed=split_seed, dataset_fingerprint=spec.fingerprint(),
                 created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), complete=True)
    attrs[VIEW_ATTR] = {"parent": os.path.relpath(parent.path.resolve(), target.parent.resolve()),
                        "parent_created": pa.get("created"),
                        "parent_dataset_fingerprint": pa["dataset_fingerprint"],
                        "parent_split_seed": pa.get("split_seed"),
                        "parent_splits": parent_splits}
    target.parent.mkdir(parents=True, exist_ok=True)
    with lock_cache(target):
        if _current(target, attrs, overwrite):
            return ResplitResult(target, "up-to-date", spec.counts())
        bad = {p for _, p, _ in skipped}
        reasons = {p: why for _, p, why in skipped}
        with atomic_write(target, ".h5") as tmp, h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = encode_attr(value)
            new_skipped = []
            for s, items in splits.items():
                full_g = f.create_group(f"split/{s}")
                full_g.create_dataset("paths", data=np.array([p for p, _ in items], dtype=object),
                                      dtype=_STR)
                full_g.create_dataset("labels", data=np.array([lab for _, lab in items],
                                                              np.int64))
                kept = [(p, lab) for p, lab in items if p not in bad]
                new_skipped += [(s, p, reasons[p]) for p, _ in items if p in bad]
                src = np.array([rows[p] for p, _ in kept], dtype=np.int64).reshape(-1, 2)
                g = f.create_group(s)
                g.create_dataset("paths", data=np.array([p for p, _ in kept], dtype=object),
                                 dtype=_STR)
                g.create_dataset("labels", data=np.array([lab for _, lab in kept], np.int64))
                g.create_dataset("source_split", data=src[:, 0].astype(np.uint8))
                g.create_dataset("source_row", data=src[:, 1])
                g.attrs["n_rows"] = len(kept)
            sk = f.create_group("skipped")
            for i, name in enumerate(("split", "path", "reason")):
                sk.create_dataset(name, data=np.array([r[i] for r in new_skipped], dtype=object),
                                  dtype=_STR)
    Cache(target)  # opens as any cache does: the parent found, its rows there
    return ResplitResult(target, "written", spec.counts())


def _current(target: Path, attrs: dict, overwrite: bool) -> bool:
    """Whether ``target`` already serves ``attrs``' split of the same features; a real cache
    of other inputs there is refused unless ``overwrite``."""
    from featx.cache.reader import Cache
    if not target.exists():
        return False
    try:
        existing = Cache(target).attrs
    except CacheError:
        existing = None
    if existing is not None and provenance_covers(existing, attrs):
        return True  # this view, or a cache extracted for that seed: the same rows
    try:
        with h5py.File(target, "r") as f:
            is_view = VIEW_ATTR in f.attrs
    except OSError:
        is_view = False
    if is_view or overwrite:
        return False
    raise StaleCacheError(f"{target} exists and is a cache of other inputs; pass --overwrite "
                          f"to replace it with a split view, or --out another folder.")


def view_parent(path: Path, attrs: dict) -> Path:
    """The parent file a view at ``path`` names (relative to the view's folder)."""
    return path.parent / attrs[VIEW_ATTR]["parent"]
