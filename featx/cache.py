"""The HDF5 feature cache: layout, reading, validation, description.

Layout (schema :data:`SCHEMA_VERSION`, readable with plain h5py)::

    /                       attrs: provenance (see README), featx_schema, complete
    /{split}/penultimate    (n, D)       float32|float16   split in train, val, test
    /{split}/pool{n}        (n, C*n*n)   channel-major flatten of AdaptiveAvgPool2d(n)
    /{split}/labels         (n,)         int64, index into attrs["classes"]
    /{split}/paths          (n,)         str, relative to attrs["dataset_root"]
    /split/{split}/paths, /split/{split}/labels   the full file list of each split, as given
    /skipped/{split,path,reason}   files that could not be decoded

Rows of ``/{split}/*`` are the readable files in split order. A file is written under
``NAME.h5.partial`` and renamed to ``NAME.h5`` only once complete, so a file with the final
name is always complete; a ``.partial`` file is resumed by the next run with the same inputs.
The file is written by :class:`featx.cache_writer.CacheWriter` (resume, free-space checks,
the per-file lock), whose names this module re-exports.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import h5py
import numpy as np

from featx.data import dataset_fingerprints
from featx.errors import FeatxError

__all__ = [
    "PENULTIMATE",
    "feature_name",
    "pool_of",
    "PROVENANCE_KEYS",
    "SCHEMA_VERSION",
    "Cache",
    "CacheError",
    "CacheLockedError",
    "CacheWriter",
    "StaleCacheError",
    "cache_filename",
    "diff_provenance",
    "lock_cache",
    "partial_path",
]

SCHEMA_VERSION = 1
# The recorded inputs that must match for a cache to be reused (timings etc. may differ).
PROVENANCE_KEYS = ("model", "weights_sha256", "transform", "precision", "store_dtype",
                   "pools", "dataset_fingerprint", "classes", "split_seed", "split_fractions")
# What every reader relies on; a file lacking one is refused up front, naming the key.
_REQUIRED_ATTRS = ("model", "classes", "features", "dataset_name", "dataset_root",
                   "dataset_fingerprint")

PENULTIMATE = "penultimate"


def feature_name(pool: int) -> str:
    """The cache's name for the ``pool`` x ``pool`` average-pooled last map: ``pool{n}``."""
    return f"pool{int(pool)}"


def pool_of(feature: str) -> int | None:
    """``n`` of a ``pool{n}`` feature name; ``None`` for ``penultimate`` or any other name."""
    digits = feature[4:] if isinstance(feature, str) and feature.startswith("pool") else ""
    if digits.isascii() and digits.isdigit():
        return int(digits)
    return None


class CacheError(FeatxError, RuntimeError):
    """A file that is not a usable featx cache; the message names the file and the problem."""


class StaleCacheError(CacheError):
    """A cache whose recorded inputs differ from the requested ones."""



def cache_filename(dataset: str, model: str, weights_tag: str, image_size: int,
                   split_seed: int | None = None) -> str:
    """``{dataset}_{model}_{weights}_{size}[_split{seed}].h5``: what changes the features.

    ``split_seed`` is the seed that made the split, ``None`` for data that came split. Seed
    0 and ``None`` add nothing, so the caches of earlier versions keep their names; another
    seed gets its own file instead of making the seed-0 cache stale.
    """
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in dataset)
    model = model.replace(":", "-")  # timm:NAME -> timm-NAME: no colons in file names
    split = f"_split{split_seed}" if split_seed else ""
    return f"{safe}_{model}_{weights_tag}_{image_size}{split}.h5"


def partial_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _encode(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if value is None:
        return "null"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        return str(value)  # h5py refuses str subclasses such as numpy.str_
    return value


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in "[{" or value == "null":
        try:
            return json.loads(value)
        except (TypeError, ValueError):
            return value
    return value


def _read_attrs(f: h5py.File) -> dict:
    return {k: _decode(v) for k, v in f.attrs.items()}


def diff_provenance(recorded: dict, requested: dict) -> list[str]:
    """Human-readable differences between two provenance dicts, over :data:`PROVENANCE_KEYS`."""
    out = []
    for key in PROVENANCE_KEYS:
        a, b = recorded.get(key), requested.get(key)
        if _decode(_encode(a)) != _decode(_encode(b)):
            if key in ("dataset_fingerprint", "weights_sha256"):
                a, b = str(a)[:12], str(b)[:12]
            out.append(f"{key}: cache has {a}, requested {b}")
    return out


def provenance_covers(recorded: dict, requested: dict) -> bool:
    """Whether a cache made with ``recorded`` already holds everything ``requested`` asks for:
    the same inputs, and every requested pool size among its pools (it may hold more)."""
    rest = {k: v for k, v in requested.items() if k != "pools"}
    same = not diff_provenance(recorded, {**rest, "pools": recorded.get("pools")})
    return same and set(requested.get("pools") or []) <= set(recorded.get("pools") or [])




class Cache:
    """A complete featx cache, opened for reading. Validated on construction.

    Holds only the path and the root attributes, so it pickles cheaply (for joblib workers);
    every read opens the file briefly.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.attrs = self._validate()

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
                attrs = _read_attrs(f)
        except OSError as exc:
            raise CacheError(f"{p} cannot be read ({exc}); it may be truncated.") from None
        if "featx_schema" not in attrs:
            raise CacheError(f"{p} is an HDF5 file but not a featx cache (no 'featx_schema' "
                             f"root attribute).")
        if attrs["featx_schema"] != SCHEMA_VERSION:
            raise CacheError(f"{p}: cache schema {attrs['featx_schema']}, this featx reads "
                             f"schema {SCHEMA_VERSION}; extract again with --overwrite.")
        if not attrs.get("complete"):
            raise CacheError(f"{p} is marked incomplete; run `featx extract` again to finish it.")
        for key in _REQUIRED_ATTRS:
            if key not in attrs:
                raise CacheError(f"{p} lacks the root attribute {key!r}; it is damaged or was "
                                 f"not written by featx. Extract again with --overwrite.")
        with h5py.File(p, "r") as f:
            keys = [f"{s}/{name}" for s in ("train", "val", "test") if s in f
                    for name in list(attrs["features"]) + ["labels", "paths"]]
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
        """Feature names, ``penultimate`` first, then pools by size."""
        return list(self.attrs["features"])

    @property
    def splits(self) -> list[str]:
        with h5py.File(self.path, "r") as f:
            return [s for s in ("train", "val", "test") if s in f]

    def check_feature(self, feature: str) -> None:
        if feature not in self.features:
            raise CacheError(f"{self.path.name} has no feature {feature!r}; it has "
                             f"{', '.join(self.features)}.")

    def shape(self, split: str, feature: str) -> tuple[int, int]:
        self.check_feature(feature)
        with h5py.File(self.path, "r") as f:
            return tuple(f[f"{split}/{feature}"].shape)

    def load(self, split: str, feature: str, dtype=np.float32) -> np.ndarray:
        """``(n, D)`` array of one split's feature, in memory."""
        self.check_feature(feature)
        with h5py.File(self.path, "r") as f:
            key = f"{split}/{feature}"
            if key not in f:
                raise CacheError(f"{self.path.name} has no split {split!r} (key {key}).")
            return f[key].astype(dtype)[:]

    def iter_rows(self, split: str, feature: str, rows: int, dtype=np.float32
                  ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, block)`` blocks of at most ``rows`` rows, without loading all."""
        self.check_feature(feature)
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
            **dataset_fingerprints({s: self.split_items(s) for s in self.splits}),
        }

    def describe(self) -> str:
        """A multi-line summary for ``featx info``."""
        a = self.attrs
        lines = [f"{self.path}", f"  complete: {bool(a.get('complete'))}   schema: "
                 f"{a['featx_schema']}   featx {a.get('featx_version')}"]
        for key in ("model", "weights_source", "weights_sha256", "transform", "image_size",
                    "timm_version", "timm_data_config", "feature_layout", "precision",
                    "store_dtype", "device", "dataset_name", "dataset_root", "dataset_layout",
                    "dataset_fingerprint", "split_seed", "split_fractions",
                    "created"):
            if key in a:
                lines.append(f"  {key}: {a[key]}")
        timings = a.get("timings") or {}
        if timings:
            lines.append(f"  timings: {timings.get('seconds', 0):.1f} s, "
                         f"{timings.get('images_per_s', 0):.1f} images/s")
        classes = self.classes
        with h5py.File(self.path, "r") as f:
            for s in self.splits:
                counts = np.bincount(f[f"{s}/labels"][:], minlength=len(classes))
                per = ", ".join(f"{c}={n}" for c, n in zip(classes, counts))
                lines.append(f"  {s}: {int(counts.sum())} images ({per})")
                for name in self.features:
                    ds = f[f"{s}/{name}"]
                    lines.append(f"    {name}: shape {ds.shape}, {ds.dtype}")
        skipped = self.skipped()
        lines.append(f"  skipped files: {len(skipped)}")
        for split, path, reason in skipped[:20]:
            lines.append(f"    {split}/{path}: {reason}")
        if len(skipped) > 20:
            lines.append(f"    ... and {len(skipped) - 20} more")
        return "\n".join(lines)


# The writing side lives in featx.cache_writer, which imports this module: re-exported on
# first use, so either module can be imported first.
_WRITER_NAMES = ("CacheLockedError", "CacheWriter", "free_bytes", "lock_cache", "lock_path")
if TYPE_CHECKING:
    from featx.cache_writer import CacheLockedError, CacheWriter, lock_cache


def __getattr__(name: str):
    if name in _WRITER_NAMES:
        from featx import cache_writer
        return getattr(cache_writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
