"""The HDF5 feature cache: layout, streaming writes with resume, reading, validation.

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
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from featx.metrics import dataset_fingerprints

__all__ = [
    "PROVENANCE_KEYS",
    "SCHEMA_VERSION",
    "Cache",
    "CacheError",
    "CacheWriter",
    "StaleCacheError",
    "cache_filename",
    "diff_provenance",
    "partial_path",
]

SCHEMA_VERSION = 1
# The recorded inputs that must match for a cache to be reused (timings etc. may differ).
PROVENANCE_KEYS = ("model", "weights_sha256", "transform", "precision", "store_dtype",
                   "pools", "dataset_fingerprint", "classes", "split_seed", "split_fractions")
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough for fast writes, small for streaming


class CacheError(RuntimeError):
    """A file that is not a usable featx cache; the message names the file and the problem."""


class StaleCacheError(CacheError):
    """A cache whose recorded inputs differ from the requested ones."""


def cache_filename(dataset: str, model: str, weights_tag: str, image_size: int) -> str:
    """``{dataset}_{model}_{weights}_{size}.h5``: the settings that change the features."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in dataset)
    model = model.replace(":", "-")  # timm:NAME -> timm-NAME: no colons in file names
    return f"{safe}_{model}_{weights_tag}_{image_size}.h5"


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


class CacheWriter:
    """Streams feature rows into a ``.partial`` file, resuming one with the same inputs.

    Parameters
    ----------
    path : Path
        Final file name; writes go to ``path.partial`` until :meth:`finish`.
    provenance : dict
        Root attributes; must include :data:`PROVENANCE_KEYS`.
    splits : dict
        ``{split: [(relpath, label), ...]}``, the full file lists.
    dims : dict
        ``{feature_name: width}``, e.g. ``{"penultimate": 512, "pool2": 2048}``.
    store_dtype : str, default "float32"
        ``"float32"`` or ``"float16"``.
    """

    def __init__(self, path: Path, provenance: dict, splits: dict, dims: dict,
                 store_dtype: str = "float32"):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.splits = splits
        self.dims = dims
        self.store_dtype = np.dtype(store_dtype)
        self.resumed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists() and self._can_resume(provenance):
            self.f = h5py.File(self.tmp, "r+")
            self._truncate_to_committed()
            self.resumed = True
        else:
            self.tmp.unlink(missing_ok=True)
            self.f = h5py.File(self.tmp, "w")
            self._create(provenance)

    # -- creation and resume ---------------------------------------------------------------
    def _can_resume(self, provenance: dict) -> bool:
        try:
            with h5py.File(self.tmp, "r") as f:
                attrs = _read_attrs(f)
                if attrs.get("featx_schema") != SCHEMA_VERSION:
                    return False
                same = not diff_provenance(attrs, provenance)
                return same and all(s in f for s in self.splits)
        except (OSError, KeyError):
            return False  # an unreadable partial is only lost work, never a result

    def _create(self, provenance: dict) -> None:
        f = self.f
        for k, v in provenance.items():
            f.attrs[k] = _encode(v)
        f.attrs["featx_schema"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        for split, items in self.splits.items():
            g = f.create_group(split)
            g.attrs["next_index"] = 0
            g.attrs["n_rows"] = 0
            g.attrs["n_items"] = len(items)
            for name, width in self.dims.items():
                rows = max(1, min(1024, _CHUNK_BYTES // (width * self.store_dtype.itemsize)))
                g.create_dataset(name, shape=(0, width), maxshape=(None, width),
                                 dtype=self.store_dtype, chunks=(rows, width))
            g.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64,
                             chunks=(4096,))
            g.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(4096,))
            full = f.create_group(f"split/{split}")
            full.create_dataset("paths", data=np.array([p for p, _ in items], dtype=object),
                                dtype=_STR)
            full.create_dataset("labels", data=np.array([lab for _, lab in items], np.int64))
        s = f.create_group("skipped")
        s.attrs["n"] = 0
        for name in ("split", "path", "reason"):
            s.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        f.flush()

    def _truncate_to_committed(self) -> None:
        """Drop rows written after the last commit (a run killed mid-batch)."""
        for split in self.splits:
            g = self.f[split]
            n = int(g.attrs["n_rows"])
            for name in list(self.dims) + ["labels", "paths"]:
                g[name].resize(n, axis=0)
        s = self.f["skipped"]
        for name in ("split", "path", "reason"):
            s[name].resize(int(s.attrs["n"]), axis=0)

    def next_index(self, split: str) -> int:
        """How many of ``split``'s files are already done (written or skipped)."""
        return int(self.f[split].attrs["next_index"])

    # -- streaming ---------------------------------------------------------------------------
    def append(self, split: str, next_index: int, features: dict[str, np.ndarray],
               labels: np.ndarray, paths: list[str], skipped: list[tuple[str, str]]) -> None:
        """Write one batch of rows, then commit ``next_index`` (files consumed so far)."""
        g = self.f[split]
        n0 = int(g.attrs["n_rows"])
        n1 = n0 + len(labels)
        if n1 > n0:
            for name, arr in features.items():
                ds = g[name]
                ds.resize(n1, axis=0)
                ds[n0:n1] = arr.astype(self.store_dtype, copy=False)
            g["labels"].resize(n1, axis=0)
            g["labels"][n0:n1] = labels
            g["paths"].resize(n1, axis=0)
            g["paths"][n0:n1] = np.array(paths, dtype=object)
        if skipped:
            s = self.f["skipped"]
            k0 = int(s.attrs["n"])
            k1 = k0 + len(skipped)
            for name, values in (("split", [split] * len(skipped)),
                                 ("path", [p for p, _ in skipped]),
                                 ("reason", [r for _, r in skipped])):
                s[name].resize(k1, axis=0)
                s[name][k0:k1] = np.array(values, dtype=object)
            s.attrs["n"] = k1
        # the commit: only after the data is in place do the counters move
        g.attrs["n_rows"] = n1
        g.attrs["next_index"] = next_index
        self.f.flush()

    def finish(self, extra_attrs: dict) -> Path:
        """Record ``extra_attrs`` (timings), mark complete and move into place atomically."""
        for k, v in extra_attrs.items():
            self.f.attrs[k] = _encode(v)
        self.f.attrs["complete"] = True
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing: the ``.partial`` file stays for the next run to resume."""
        try:
            self.f.close()
        except Exception:
            pass


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
