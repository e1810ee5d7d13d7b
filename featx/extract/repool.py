"""New pool sizes from the spatial maps a cache kept (``extract --keep-map``), without the
backbone: ``featx pool CACHE --pool 3,5``.

A kept map is stored flattened, ``/{split}/LAYER.map`` (``/{split}/map`` for the last map) of
shape ``(n, C*h*w)``, with ``attrs["maps"] = {name: [C, h, w]}``. Re-pooling reads it in row
blocks, reshapes to ``(b, C, h, w)`` and applies the same ``AdaptiveAvgPool2d(n)`` in fp32
extraction applies, so a re-pooled feature equals an extracted one (exactly, from an fp32
map; to fp16 rounding from the default fp16 map). The file is rewritten as a whole under
``NAME.h5.partial`` and moved into place, holding the cache's lock, so a crash leaves the
original cache as it was.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from featx.backbones import get_backbone
from featx.cache import Cache, CacheError, encode_attr, lock_cache, partial_path
from featx.features import MAP, PENULTIMATE, feature_name, layer_feature

__all__ = ["repool"]

_BLOCK_BYTES = 64 << 20


def _map_layer(name: str) -> str:
    return "" if name == MAP else name.removesuffix(f".{MAP}")


def repool(path: str | Path, pools) -> list[str]:
    """Add ``pool{n}`` for every ``n`` of ``pools`` to every kept map of the cache ``path``;
    returns the names added (none when all are there already).

    Raises :class:`~featx.cache.CacheError` when the cache kept no map.
    """
    path = Path(path)
    cache = Cache(path)
    maps = cache.attrs.get("maps") or {}
    if not maps:
        raise CacheError(f"{path.name} kept no spatial map; extract it with --keep-map to "
                         f"add pool sizes later without the backbone.")
    spec = get_backbone(cache.attrs["model"])
    have = set(cache.features) | set(cache.aliases)
    aliases = dict(cache.aliases)
    todo: list[tuple[str, str, int]] = []  # (map dataset, new feature, n)
    for name in maps:
        layer = _map_layer(name)
        for n in sorted({int(p) for p in pools}):
            new = layer_feature(layer, feature_name(n))
            if new in have:
                continue
            if not layer and feature_name(n) == spec.penultimate_alias:
                aliases[new] = PENULTIMATE  # pool1 of a global-average-pool head: stored
                continue
            todo.append((name, new, n))
            if not layer and spec.map_layer in (cache.attrs.get("layers") or []):
                # the last stage's pools are the last map's: stored once
                aliases[layer_feature(spec.map_layer, feature_name(n))] = new
    if not todo and aliases == cache.aliases:
        return []
    with lock_cache(path):
        tmp = partial_path(path)
        shutil.copyfile(path, tmp)
        try:
            with h5py.File(tmp, "r+") as f:
                dtype = np.dtype(cache.attrs.get("store_dtype") or "float32")
                for split in cache.splits:
                    g = f[split]
                    for name, new, n in todo:
                        _pool_into(g, name, new, n, tuple(maps[name]), dtype)
                features = list(cache.features) + [new for _, new, _ in todo]
                f.attrs["features"] = encode_attr(features)
                f.attrs["feature_aliases"] = encode_attr(aliases)
                f.attrs["pools"] = encode_attr(sorted(set(cache.attrs.get("pools") or [])
                                                      | {int(p) for p in pools}))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return [new for _, new, _ in todo] + [a for a in aliases if a not in cache.aliases]


def _pool_into(g: h5py.Group, name: str, new: str, n: int, chw: tuple, dtype) -> None:
    src = g[name]
    c = chw[0]
    rows = src.shape[0]
    width = c * n * n
    # the writer's layout: resizable along rows, ~1 MiB chunks of whole rows
    ds = g.create_dataset(new, shape=(rows, width), maxshape=(None, width), dtype=dtype,
                          chunks=(max(1, min(1024, (1 << 20) // (width * dtype.itemsize))),
                                  width))
    block = max(1, _BLOCK_BYTES // (4 * int(np.prod(chw))))
    for a in range(0, rows, block):
        x = torch.from_numpy(src[a:a + block].astype(np.float32)).view(-1, *chw)
        ds[a:a + len(x)] = F.adaptive_avg_pool2d(x, n).flatten(1).numpy().astype(dtype)
