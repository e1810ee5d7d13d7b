"""The single frozen pass: images -> backbone -> penultimate + every pool{n} -> HDF5.

Each batch goes through the model once; ``penultimate`` is the model's own pre-logits and
``pool{n}`` is ``AdaptiveAvgPool2d(n)`` of the last spatial map, all from that one forward.
Rows are streamed to the cache as the pass goes, so memory does not grow with the dataset,
and a killed run resumes from the last committed batch. The model itself, in its fast eval
form, is featx/frozen.py's.
"""
from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import featx
from featx.backbones import backbone_provenance, get_backbone
from featx.cache import (PENULTIMATE, Cache, StaleCacheError, cache_filename, diff_provenance,
                         feature_name, provenance_covers)
from featx.cache_writer import CacheWriter, lock_cache
from featx.config import STORE_DTYPES, ExtractConfig
from featx.data import DataError, DatasetSpec
from featx.errors import ParameterError
# the model and its forward; re-exported for callers of the old path
from featx.frozen import (FrozenModel, compile_model, feature_dims, forward_batch, frozen_model,
                          prepare_for_inference)
from featx.images import ImageFiles, TransformSpec
from featx.runtime import (autocast, cap_workers, extract_workers, resolve_device,
                           resolve_precision, setup)

__all__ = ["ExtractConfig", "ExtractResult", "FrozenModel", "compile_model", "extract",
           "feature_dims", "fill_cache", "forward_batch", "frozen_model", "parse_pools",
           "pool_notes", "prepare_for_inference",
           # moved to featx.runtime; kept here for callers of the old path
           "autocast", "resolve_device", "resolve_precision"]


@dataclass
class ExtractResult:
    """What :func:`extract` did. ``status`` is ``written``, ``resumed`` or ``up-to-date``."""

    path: Path
    status: str
    n_images: int = 0
    n_skipped: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    weights_source: str = ""
    skipped: list = field(default_factory=list)
    notes: list = field(default_factory=list)  # lines for the user, e.g. a compile fallback
    precision: str = ""  # what --precision auto resolved to


def parse_pools(text: str) -> tuple[int, ...]:
    """``"1,2,4,8"`` -> ``(1, 2, 4, 8)``, sorted and unique; ``""`` -> ``()``."""
    try:
        pools = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        pools = [0]
    if any(p < 1 or p > 64 for p in pools):
        raise ParameterError("pools", text, "give pool sizes as integers 1..64 separated by "
                             "commas, e.g. 1,2,4,8")
    return tuple(pools)


def pool_notes(map_hw: tuple[int, int], crop: int, pools, model: str) -> list[str]:
    """Notes for the pool sizes larger than the last spatial map, ``map_hw`` = ``(h, w)``.

    ``AdaptiveAvgPool2d(n)`` of an ``h x w`` map with ``n > h`` repeats map values instead of
    averaging them, so such a feature is wider without holding more. It is kept (a 1x1 map
    at a small image size is common, and the numbers are well defined), but said.
    """
    h, w = map_hw
    big = [n for n in pools if n > min(h, w)]
    if not big:
        return []
    return [f"note: --pool {','.join(map(str, big))} is larger than {model}'s last spatial map "
            f"at {crop} px ({h}x{w}): those pool features repeat the map's values and hold no "
            f"more than pool{min(h, w)}. A larger --image-size gives a larger map."]


def _provenance(cfg: ExtractConfig, data: DatasetSpec, weights, transform: TransformSpec,
                precision: str, device: torch.device) -> dict:
    spec = get_backbone(cfg.model)
    features = [PENULTIMATE] + [feature_name(n) for n in cfg.pools]
    return {
        "featx_version": featx.__version__,
        "model": cfg.model,
        "weights_kind": weights.kind,
        "weights_source": weights.source,
        "weights_sha256": weights.sha256,
        # where the weights were and which release: `featx predict` rebuilds the same backbone
        "weights_path": weights.path,
        "weights_version": weights.version,
        "transform": transform.to_dict(),
        "image_size": transform.crop,
        "precision": precision,
        "store_dtype": cfg.store,
        "pools": list(cfg.pools),
        "features": features,
        "penultimate_dim": spec.penultimate_dim,
        "spatial_channels": spec.spatial_channels,
        "dataset_name": data.name,
        "dataset_root": str(Path(data.root).resolve()),
        "dataset_layout": data.layout,
        "dataset_fingerprint": data.fingerprint(),
        "classes": list(data.classes),
        "split_seed": data.seed,
        "split_fractions": list(data.fractions) if data.fractions else None,
        "device": str(device),
        "world_size": 1,  # featx/shards.py records torchrun's
        "torch_version": torch.__version__,
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # timm models: timm's version and resolved data config (the transform's source)
        **backbone_provenance(cfg.model, transform.crop),
    }


def extract(data: DatasetSpec, cfg: ExtractConfig) -> ExtractResult:
    """Run ``cfg.model`` frozen over every split of ``data`` and write one cache file.

    Returns at once (status ``up-to-date``) when a complete cache with the same inputs
    exists; raises :class:`~featx.cache.StaleCacheError` naming what differs when one with
    other inputs exists and ``cfg.overwrite`` is false. The cache is locked from the check
    to the final rename, so a second run on the same file refuses
    (:class:`~featx.cache.CacheLockedError`) instead of touching the first one's ``.partial``.
    """
    with contextlib.ExitStack() as held:
        return _extract(data, cfg, held)


def _extract(data: DatasetSpec, cfg: ExtractConfig, held: contextlib.ExitStack) -> ExtractResult:
    if cfg.batch_size < 1:
        raise ParameterError("batch_size", cfg.batch_size, "must be at least 1.")
    if cfg.store not in STORE_DTYPES:
        raise ParameterError("store", cfg.store, f"use {' or '.join(STORE_DTYPES)}.")
    ready = setup(cfg.model, cfg.weights, device=cfg.device, precision=cfg.precision,
                  image_size=cfg.image_size, seed=cfg.seed)
    device, precision, weights, transform = (ready.device, ready.precision, ready.weights,
                                             ready.transform)
    prov = _provenance(cfg, data, weights, transform, precision, device)
    path = Path(cfg.out_dir) / cache_filename(data.name, cfg.model, weights.tag, transform.crop,
                                              data.seed)
    from featx.shards import dist_env
    if dist_env().rank == 0:  # under torchrun rank 0 holds it for the whole job
        held.enter_context(lock_cache(path))

    if path.exists():
        try:
            existing = Cache(path).attrs
        except Exception:
            existing = None
        if existing is not None and provenance_covers(existing, prov):
            # the same inputs; extra pool sizes in the file do no harm to whoever asks for fewer
            return ExtractResult(path, "up-to-date", weights_source=weights.source,
                                 precision=precision)
        if not cfg.overwrite:
            diffs = diff_provenance(existing, prov) if existing else ["it is not a readable cache"]
            raise StaleCacheError(f"{path} exists with other inputs ({'; '.join(diffs)}). "
                                  f"Pass --overwrite to replace it, or --out another folder.")

    # under torchrun, or with shards of an earlier sharded run on disk: featx/shards.py
    from featx.shards import extract_sharded
    sharded = extract_sharded(data, cfg, ready, path=path, prov=prov)
    if sharded is not None:
        return sharded

    notes: list[str] = []  # a compile fallback is said at the first batch
    frozen = frozen_model(cfg.model, ready, compile_batch=cfg.batch_size if cfg.compile else None,
                          notes=notes)
    writer = CacheWriter(path, prov, data.splits, feature_dims(cfg.model, cfg.pools), cfg.store)
    notes += writer.notes
    workers = extract_workers(device) if cfg.workers is None else cfg.workers
    workers, note = cap_workers(workers)
    notes += [note] if note else []
    total = sum(len(v) for v in data.splits.values())
    done = sum(writer.next_index(s) for s in data.splits)
    map_size: dict = {}  # (h, w) of the last spatial map, seen by the first batch
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=done, unit="img", desc=f"extract {cfg.model}",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        n_written, skipped = fill_cache(writer, data.root, data.splits, frozen, cfg.pools,
                                        batch_size=cfg.batch_size, workers=workers, bar=bar,
                                        map_size=map_size)
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if map_size:
        notes += pool_notes(map_size["hw"], transform.crop, cfg.pools, cfg.model)
    if int(writer.f["train"].attrs["n_rows"]) == 0:
        # a cache without a readable train image is of no use to any head: no file at all
        writer.close()
        writer.tmp.unlink(missing_ok=True)
        n_train = len(data.splits["train"])
        why = next((f" (e.g. {p}: {e})" for s, p, e in skipped if s == "train"), "")
        raise DataError(f"{data.root}: none of the {n_train} image(s) of the train split could "
                        f"be read{why}; no cache was written.")
    rate = (n_written + len(skipped)) / seconds if seconds > 0 else 0.0
    writer.finish({"timings": {"seconds": round(seconds, 3), "images_per_s": round(rate, 2),
                               "resumed": writer.resumed, "images": n_written}})
    return ExtractResult(path, "resumed" if writer.resumed else "written", n_written,
                         len(Cache(path).skipped()), seconds, rate, weights.source,
                         Cache(path).skipped(), notes, precision)


def fill_cache(writer: CacheWriter, root, splits: dict, frozen: FrozenModel, pools, *,
               batch_size: int, workers: int, bar, map_size: dict | None = None,
               after_commit=None) -> tuple[int, list]:
    """Extract the rows of ``splits`` that ``writer`` has not committed, batch by batch.

    Returns ``(written, skipped)``, ``skipped`` the ``(split, path, reason)`` of unreadable
    files. ``after_commit()`` runs after each committed batch.
    """
    tf = frozen.transform.eval_transform_uint8()  # normalised per batch, in forward_batch
    written, skipped = 0, []
    for split, items in splits.items():
        start = writer.next_index(split)
        if start >= len(items):
            continue
        ds = torch.utils.data.Subset(ImageFiles(root, items, tf, frozen.transform.crop,
                                                dtype=torch.uint8),
                                     range(start, len(items)))
        loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, shuffle=False, num_workers=workers,
            pin_memory=frozen.device.type == "cuda", persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None)
        for images, labels, idx, errors in loader:
            feats = frozen.features(images, pools, map_size=map_size)
            ok = np.array([e == "" for e in errors])
            bad = [(items[i][0], e) for i, e in zip(idx.tolist(), errors) if e]
            writer.append(split, int(idx[-1]) + 1, {k: v[ok] for k, v in feats.items()},
                          labels.numpy()[ok], [items[i][0] for i in idx[ok].tolist()], bad)
            if after_commit is not None:
                after_commit()
            written += int(ok.sum())
            skipped += [(split, p, e) for p, e in bad]
            bar.update(len(labels))
    return written, skipped
