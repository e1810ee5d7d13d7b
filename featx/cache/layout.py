"""The HDF5 feature cache's layout: its version, names, attributes and provenance rules.

Layout (schema :data:`SCHEMA_VERSION`, readable with plain h5py)::

    /                       attrs: provenance (see docs/formats.md), featx_schema, complete
    /{split}/penultimate    (n, D)       float32|float16   split in train, val, test
    /{split}/pool{n}        (n, C*n*n)   channel-major flatten of AdaptiveAvgPool2d(n)
    /{split}/labels         (n,)         int64, index into attrs["classes"]
    /{split}/paths          (n,)         str, relative to attrs["dataset_root"]
    /split/{split}/paths, /split/{split}/labels   the full file list of each split, as given
    /skipped/{split,path,reason}   files that could not be decoded

Rows of ``/{split}/*`` are the readable files in split order. A file is written under
``NAME.h5.partial`` and renamed to ``NAME.h5`` only once complete, so a file with the final
name is always complete; a ``.partial`` file is resumed by the next run with the same inputs.
The file is written by :class:`featx.cache.writer.CacheWriter` (resume, free-space checks,
the per-file lock) and read by :class:`featx.cache.reader.Cache`; both follow this module.
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from featx.errors import FeatxError

__all__ = ["PROVENANCE_KEYS", "REQUIRED_ATTRS", "SCHEMA_VERSION", "CacheError", "StaleCacheError",
           "cache_filename", "decode_attr", "diff_provenance", "encode_attr", "partial_path",
           "provenance_covers", "read_attrs"]

SCHEMA_VERSION = 1
# The recorded inputs that must match for a cache to be reused (timings etc. may differ).
PROVENANCE_KEYS = ("model", "weights_sha256", "transform", "precision", "store_dtype",
                   "pools", "dataset_fingerprint", "classes", "split_seed", "split_fractions")
# What every reader relies on; a file lacking one is refused up front, naming the key.
REQUIRED_ATTRS = ("model", "classes", "features", "dataset_name", "dataset_root",
                   "dataset_fingerprint")

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


def encode_attr(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if value is None:
        return "null"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str):
        return str(value)  # h5py refuses str subclasses such as numpy.str_
    return value


def decode_attr(value):
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


def read_attrs(f: h5py.File) -> dict:
    return {k: decode_attr(v) for k, v in f.attrs.items()}


def diff_provenance(recorded: dict, requested: dict) -> list[str]:
    """Human-readable differences between two provenance dicts, over :data:`PROVENANCE_KEYS`."""
    out = []
    for key in PROVENANCE_KEYS:
        a, b = recorded.get(key), requested.get(key)
        if decode_attr(encode_attr(a)) != decode_attr(encode_attr(b)):
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
