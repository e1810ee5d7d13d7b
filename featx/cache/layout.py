"""The HDF5 feature cache's layout: its version, names, attributes and provenance rules.

Layout (schema :data:`SCHEMA_VERSION`, readable with plain h5py; docs/layers.md)::

    /                       attrs: provenance (see docs/formats.md), featx_schema, complete,
                            features (the stored names, in order), feature_aliases,
                            layers (as requested), layer_maps ({layer: [h, w]})
    /{split}/penultimate    (n, D)       float32|float16   split in train, val, test
    /{split}/pool{n}        (n, C*n*n)   channel-major flatten of AdaptiveAvgPool2d(n)
    /{split}/LAYER.pool{n}  (n, C*n*n)   the same of the module LAYER's output (layer3.pool2)
    /{split}/LAYER.cls      (n, C)       a ViT block's class token
    /{split}/last4          (n, 5*C)     DINOv2 linear eval: last 4 class tokens + mean patch
    /{split}/LAYER.map, map (n, C*h*w)   kept maps (--keep-map; attrs maps, map_store)
    /{split}/labels         (n,)         int64, index into attrs["classes"]
    /{split}/paths          (n,)         str, relative to attrs["dataset_root"]
    /split/{split}/paths, /split/{split}/labels   the full file list of each split, as given
    /skipped/{split,path,reason}   files that could not be decoded

Rows of ``/{split}/*`` are the readable files in split order. A feature equal to another
(``pool1`` = ``penultimate`` for a global-average-pool head, the last stage's ``pool{n}`` =
the last map's) is stored once: ``feature_aliases`` maps each other name to the stored one,
and the reader serves it under both.

Schema 2 (this one) added layers and aliases; a schema-1 file is a schema-2 file without
them, so it is read as it is (:data:`READABLE_SCHEMAS`). Writers write schema 2 only. A file is written under
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

__all__ = ["PROVENANCE_KEYS", "READABLE_SCHEMAS", "REQUIRED_ATTRS", "SCHEMA_VERSION", "CacheError", "StaleCacheError",
           "cache_filename", "decode_attr", "diff_provenance", "encode_attr", "partial_path",
           "provenance_covers", "read_attrs"]

SCHEMA_VERSION = 2
# Schemas this featx reads: 1 had no layers and no aliases, and is otherwise the same.
READABLE_SCHEMAS = (1, 2)
# The recorded inputs that must match for a cache to be reused (timings etc. may differ).
PROVENANCE_KEYS = ("model", "weights_sha256", "transform", "precision", "store_dtype",
                   "pools", "layers", "keep_map", "dataset_fingerprint", "classes", "split_seed",
                   "split_fractions")
# keys a schema-1 file lacks, and what their absence means
_ABSENT_MEANS = {"layers": [], "keep_map": False}
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
        a, b = (d.get(key, _ABSENT_MEANS.get(key)) for d in (recorded, requested))
        if decode_attr(encode_attr(a)) != decode_attr(encode_attr(b)):
            if key in ("dataset_fingerprint", "weights_sha256"):
                a, b = str(a)[:12], str(b)[:12]
            out.append(f"{key}: cache has {a}, requested {b}")
    return out


def provenance_covers(recorded: dict, requested: dict) -> bool:
    """Whether a cache made with ``recorded`` already holds everything ``requested`` asks for:
    the same inputs, every requested pool size among its pools and every requested layer
    among its layers (it may hold more)."""
    rest = {k: v for k, v in requested.items() if k not in ("pools", "layers", "keep_map")}
    # a cache that kept its maps also serves a request that does not ask for them
    keep = requested.get("keep_map") or False
    same = not diff_provenance(recorded, {**rest, "pools": recorded.get("pools"),
                                          "layers": recorded.get("layers", []),
                                          "keep_map": recorded.get("keep_map", False)
                                          if not keep else True})
    return (same and set(requested.get("pools") or []) <= set(recorded.get("pools") or [])
            and set(requested.get("layers") or []) <= set(recorded.get("layers") or []))
