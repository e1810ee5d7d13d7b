"""Reading a complete cache: validation on open, features, labels, file lists, description."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from featx.cache.layout import (READABLE_SCHEMAS, REQUIRED_ATTRS, SCHEMA_VERSION, CacheError,
                                read_attrs)
from featx.cache.views import VIEW_ATTR, view_parent
from featx.data import dataset_fingerprints

__all__ = ["Cache"]


# rows read at once when gathering a view's rows from its parent: bounds the memory of a
# read to this many parent rows beside the result
_GATHER_ROWS = 8192


def _read_rows(ds: h5py.Dataset, rows: np.ndarray, dtype) -> np.ndarray:
    """``ds[rows]`` for any order of ``rows``, read as contiguous slices (h5py's fancy
    indexing is slow for long lists) of at most :data:`_GATHER_ROWS` rows each."""
    out = np.empty((len(rows),) + ds.shape[1:], dtype=dtype)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    i = 0
    while i < len(ordered):
        lo = int(ordered[i])
        j = int(np.searchsorted(ordered, lo + _GATHER_ROWS, side="left"))
        block = ds[lo:int(ordered[j - 1]) + 1]
        out[order[i:j]] = block[ordered[i:j] - lo]
        i = j
    return out


class Cache:
    """A complete featx cache, opened for reading. Validated on construction.

    Holds only the path and the root attributes, so it pickles cheaply (for joblib workers);
    every read opens the file briefly. A split view (:mod:`featx.cache.views`) reads the
    same way: its features come from its :attr:`parent`'s rows.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.attrs = self._validate()
        self.parent = self._open_parent() if self.is_view else None

    @property
    def is_view(self) -> bool:
        """Whether this file is a split view of another cache's rows."""
        return VIEW_ATTR in self.attrs

    def _open_parent(self) -> "Cache":
        view = self.attrs[VIEW_ATTR]
        parent_path = view_parent(self.path, self.attrs)
        again = (f"run `featx resplit {parent_path} --split-seed {self.attrs.get('split_seed')}` "
                 f"again, or extract that split")
        try:
            parent = Cache(parent_path)
        except CacheError as exc:
            raise CacheError(f"{self.path} is a split view of {parent_path}, which cannot be "
                             f"read ({exc}); {again}.") from None
        if (parent.attrs.get("created") != view.get("parent_created")
                or parent.attrs.get("dataset_fingerprint")
                != view.get("parent_dataset_fingerprint")):
            raise CacheError(f"{self.path} is a split view of {parent_path}, which was "
                             f"extracted again since; {again}.")
        for feature in self.features:
            parent.check_feature(feature)
        return parent

    def _validate(self) -> dict:
        p = self.path
        if p.name.endswith(".partial"):
            raise CacheError(f"{p} is an unfinished extraction; run the same `featx extract` "
                             f"command again to complete it.")
        if not p.is_file():
            raise CacheError(f"{p}: no such cache file.")
        if not h5py.is_hdf5(p):
            raise CacheError(f"{p} is not an HDF5 file, so not a featx cache.")
        try:
            with h5py.File(p, "r") as f:
                attrs = read_attrs(f)
        except OSError as exc:
            raise CacheError(f"{p} cannot be read ({exc}); it may be truncated.") from None
        if "featx_schema" not in attrs:
            raise CacheError(f"{p} is an HDF5 file but not a featx cache (no 'featx_schema' "
                             f"root attribute).")
        if attrs["featx_schema"] not in READABLE_SCHEMAS:
            raise CacheError(f"{p}: cache schema {attrs['featx_schema']}, this featx reads "
                             f"schema {' and '.join(map(str, READABLE_SCHEMAS))} (writes "
                             f"{SCHEMA_VERSION}); extract again with --overwrite.")
        if not attrs.get("complete"):
            raise CacheError(f"{p} is marked incomplete; run `featx extract` again to finish it.")
        for key in REQUIRED_ATTRS:
            if key not in attrs:
                raise CacheError(f"{p} lacks the root attribute {key!r}; it is damaged or was "
                                 f"not written by featx. Extract again with --overwrite.")
        row_keys = (["source_split", "source_row"] if VIEW_ATTR in attrs
                    else list(attrs["features"]))  # a view's features are its parent's
        with h5py.File(p, "r") as f:
            keys = [f"{s}/{name}" for s in ("train", "val", "test") if s in f
                    for name in row_keys + ["labels", "paths"]]
            keys += [f"skipped/{name}" for name in ("split", "path", "reason")]
            if "train" not in f:
                keys.append("train")
            for key in keys:
                if key not in f:
                    raise CacheError(f"{p} lacks the dataset {key!r}; it is damaged or was not "
                                     f"written by featx. Extract again with --overwrite.")
        return attrs

    # -- what is in it -------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def features(self) -> list[str]:
        """The stored feature names, each once: ``penultimate`` first, then the last map's
        pools by size, then each layer's features in forward order."""
        return list(self.attrs["features"])

    @property
    def aliases(self) -> dict[str, str]:
        """``{name: stored name}`` of features stored under another name (``pool1`` ->
        ``penultimate`` where they are equal); empty for a schema-1 cache."""
        return dict(self.attrs.get("feature_aliases") or {})

    def stored_name(self, feature: str) -> str:
        """The dataset ``feature`` is stored under (itself, or the one it is an alias of)."""
        self.check_feature(feature)
        return self.aliases.get(feature, feature)

    @property
    def splits(self) -> list[str]:
        with h5py.File(self.path, "r") as f:
            return [s for s in ("train", "val", "test") if s in f]

    def check_feature(self, feature: str) -> None:
        if feature not in self.features and feature not in self.aliases:
            raise CacheError(f"{self.path.name} has no feature {feature!r}; it has "
                             f"{', '.join(self.features)}.")

    def shape(self, split: str, feature: str) -> tuple[int, int]:
        feature = self.stored_name(feature)
        if self.is_view:
            return (len(self.labels(split)), self.parent.shape("train", feature)[1])
        with h5py.File(self.path, "r") as f:
            return tuple(f[f"{split}/{feature}"].shape)

    def _sources(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A view's ``(parent split index, parent row)`` of every row of ``split``."""
        with h5py.File(self.path, "r") as f:
            if split not in f:
                raise CacheError(f"{self.path.name} has no split {split!r}.")
            return f[f"{split}/source_split"][:], f[f"{split}/source_row"][:]

    def _gather(self, split: str, feature: str, idx: np.ndarray, dtype) -> np.ndarray:
        """Rows ``idx`` of a view's ``split``, read from the parent's splits."""
        src_split, src_row = self._sources(split)
        src_split, src_row = src_split[idx], src_row[idx]
        out = np.empty((len(idx), self.shape(split, feature)[1]), dtype=dtype)
        with h5py.File(self.parent.path, "r") as f:
            for i, name in enumerate(self.attrs[VIEW_ATTR]["parent_splits"]):
                mask = src_split == i
                if mask.any():
                    out[mask] = _read_rows(f[f"{name}/{feature}"], src_row[mask], dtype)
        return out

    def load(self, split: str, feature: str, dtype=np.float32) -> np.ndarray:
        """``(n, D)`` array of one split's feature, in memory."""
        feature = self.stored_name(feature)
        if self.is_view:
            return self._gather(split, feature, np.arange(len(self.labels(split))), dtype)
        with h5py.File(self.path, "r") as f:
            key = f"{split}/{feature}"
            if key not in f:
                raise CacheError(f"{self.path.name} has no split {split!r} (key {key}).")
            return f[key].astype(dtype)[:]

    def rows(self, split: str, feature: str, idx: np.ndarray, dtype=np.float32) -> np.ndarray:
        """``(len(idx), D)``: rows ``idx`` (any order) of one split's feature."""
        self.check_feature(feature)
        idx = np.asarray(idx, dtype=np.int64)
        if self.is_view:
            return self._gather(split, feature, idx, dtype)
        with h5py.File(self.path, "r") as f:
            return _read_rows(f[f"{split}/{feature}"], idx, dtype)

    def iter_rows(self, split: str, feature: str, rows: int, dtype=np.float32
                  ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` blocks of at most ``rows`` rows, without loading all."""
        feature = self.stored_name(feature)
        if self.is_view:
            n = len(self.labels(split))
            for start in range(0, n, rows):
                yield start, self._gather(split, feature,
                                          np.arange(start, min(start + rows, n)), dtype)
            return
        with h5py.File(self.path, "r") as f:
            ds = f[f"{split}/{feature}"]
            for start in range(0, ds.shape[0], rows):
                yield start, ds[start:start + rows].astype(dtype, copy=False)

    def labels(self, split: str) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            return f[f"{split}/labels"][:]

    def paths(self, split: str) -> list[str]:
        with h5py.File(self.path, "r") as f:
            return list(f[f"{split}/paths"].asstr()[:])

    def skipped(self) -> list[tuple[str, str, str]]:
        """``(split, path, reason)`` of every file that could not be decoded."""
        with h5py.File(self.path, "r") as f:
            s = f["skipped"]
            return list(zip(s["split"].asstr()[:], s["path"].asstr()[:], s["reason"].asstr()[:]))

    def split_items(self, split: str) -> list[tuple[str, int]]:
        """The extracted ``(relpath, label)`` rows of ``split`` (readable files only)."""
        return list(zip(self.paths(split), self.labels(split).tolist()))

    def dataset_info(self) -> dict:
        """What a result records about the data: name, classes, counts, fingerprints."""
        return {
            "name": self.attrs["dataset_name"],
            "root": self.attrs["dataset_root"],
            "classes": self.classes,
            "fingerprint": self.attrs["dataset_fingerprint"],
            "split_seed": self.attrs.get("split_seed"),
            **dataset_fingerprints({s: self.split_items(s) for s in self.splits}),
        }

    def describe(self) -> str:
        """A multi-line summary for ``featx info``."""
        a = self.attrs
        lines = [f"{self.path}", f"  complete: {bool(a.get('complete'))}   schema: "
                 f"{a['featx_schema']}   featx {a.get('featx_version')}"]
        for key in ("model", "layers", "layer_maps", "weights_source", "weights_sha256",
                    "transform", "image_size",
                    "timm_version", "timm_data_config", "feature_layout", "precision",
                    "engine", "engine_version", "store_dtype", "device", "dataset_name",
                    "dataset_root", "dataset_layout", "dataset_fingerprint", "split_seed",
                    "split_fractions", "created"):
            if key in a:
                lines.append(f"  {key}: {a[key]}")
        timings = a.get("timings") or {}
        if timings:
            lines.append(f"  timings: {timings.get('seconds', 0):.1f} s, "
                         f"{timings.get('images_per_s', 0):.1f} images/s")
        classes = self.classes
        if self.is_view:
            lines.append(f"  split view of: {self.parent.path} (its rows, no copy of a feature)")
        store = self.parent.path if self.is_view else self.path
        with h5py.File(store, "r") as f:
            for s in self.splits:
                counts = np.bincount(self.labels(s), minlength=len(classes))
                per = ", ".join(f"{c}={n}" for c, n in zip(classes, counts))
                lines.append(f"  {s}: {int(counts.sum())} images ({per})")
                for name in self.features + ([] if self.is_view else list(a.get("maps") or {})):
                    if self.is_view:  # the rows are the parent's
                        lines.append(f"    {name}: shape {self.shape(s, name)}")
                        continue
                    ds = f[f"{s}/{name}"]
                    size = ds.id.get_storage_size() / 2**20
                    lines.append(f"    {name}: shape {ds.shape}, {ds.dtype}, {size:.2f} MB")
        for name, stored in self.aliases.items():
            lines.append(f"  {name}: = {stored} (identical, stored once)")
        skipped = self.skipped()
        lines.append(f"  skipped files: {len(skipped)}")
        for split, path, reason in skipped[:20]:
            lines.append(f"    {split}/{path}: {reason}")
        if len(skipped) > 20:
            lines.append(f"    ... and {len(skipped) - 20} more")
        return "\n".join(lines)

