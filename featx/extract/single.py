"""The single frozen pass: images -> backbone -> penultimate + every pool{n} + every
requested layer's features -> HDF5.

Each batch goes through the model once; ``penultimate`` is the model's own pre-logits,
``pool{n}`` is ``AdaptiveAvgPool2d(n)`` of the last spatial map and ``LAYER.pool{n}`` that of
a layer's output (``--layers``, :mod:`featx.backbones.layers`), all from that one forward.
Rows are streamed to the cache as the pass goes, so memory does not grow with the dataset,
and a killed run resumes from the last committed batch. The model itself, in its fast eval
form, is :mod:`featx.backbones.frozen`'s; the fill loop is :mod:`featx.extract.fill`'s.
"""
from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import featx
from featx.backbones import (
    RunSetup,
    backbone_provenance,
    check_engine_serves,
    frozen_model,
    get_backbone,
    layer_notes,
    layer_plan,
    pool_notes,
    resolve_run,
)
from featx.cache import (
    Cache,
    CacheWriter,
    StaleCacheError,
    cache_filename,
    diff_provenance,
    lock_cache,
    provenance_covers,
)
from featx.config import ExtractConfig, check_settings
from featx.data import DataError, DatasetSpec
from featx.distributed import is_main_process
from featx.errors import ParameterError
from featx.extract.fill import ExtractResult, fill_cache
from featx.extract.sharded import extract_sharded
from featx.runtime import cap_workers, extract_workers

__all__ = ["extract", "map_dtypes", "parse_pools"]


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


def _provenance(cfg: ExtractConfig, data: DatasetSpec, ready: RunSetup) -> dict:
    weights, transform, precision, device = (ready.weights, ready.transform, ready.precision,
                                             ready.device)
    spec = get_backbone(cfg.model)
    plan = layer_plan(cfg.model, tuple(cfg.layers), tuple(cfg.pools), transform.crop,
                      cfg.keep_map)
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
        # what ran the forward; not in PROVENANCE_KEYS: engines agree with torch fp32 within
        # 1e-5, so a cache from one serves a run asking for another (docs/engines.md)
        "engine": ready.engine,
        "engine_version": ready.engine_version,
        "store_dtype": cfg.store,
        "pools": list(cfg.pools),
        # the layers read, resolved (stages -> layer1..layer4), last4 as such
        "layers": list(plan.layers) + (["last4"] if plan.last4 else []),
        "features": list(plan.features),
        "keep_map": cfg.keep_map,
        # kept maps, (C, h, w) each, stored flattened in map_store
        "maps": {name: list(chw) for name, chw in plan.maps.items()},
        "map_store": cfg.map_store if cfg.keep_map else None,
        # requested names stored under another one (pool1 -> penultimate, ...): stored once
        "feature_aliases": dict(plan.aliases),
        "layer_maps": {layer or "last": list(hw) for layer, hw in plan.map_hw.items()},
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
        "world_size": 1,  # featx/extract/sharded.py records torchrun's
        "torch_version": torch.__version__,
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # timm models: timm's version and resolved data config (the transform's source)
        **backbone_provenance(cfg.model, transform.crop),
    }


def map_dtypes(plan, cfg: ExtractConfig) -> dict:
    """``{kept map: --map-store dtype}``: maps default to fp16 (they are large)."""
    return {name: cfg.map_store for name in plan.maps}


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
    _check_settings(cfg)
    # an exported graph gives the last map and the penultimate only: intermediate layers and
    # kept maps run in torch (asked for by name, another engine is refused by frozen_model)
    check_engine_serves(cfg.engine, cfg.layers, cfg.keep_map)  # before any file is touched
    engine = "torch" if cfg.engine == "auto" and (cfg.layers or cfg.keep_map) else cfg.engine
    ready = resolve_run(cfg.model, cfg.weights, device=cfg.device, precision=cfg.precision,
                        image_size=cfg.image_size, seed=cfg.seed, engine=engine)
    prov = _provenance(cfg, data, ready)
    path = Path(cfg.out_dir) / cache_filename(data.name, cfg.model, ready.weights.tag,
                                              ready.transform.crop, data.seed)
    if is_main_process():  # under torchrun rank 0 holds it for the whole job
        held.enter_context(lock_cache(path))
    if _up_to_date(path, prov, cfg.overwrite):
        # the same inputs; extra pool sizes in the file do no harm to whoever asks for fewer
        return ExtractResult(path, "up-to-date", weights_source=ready.weights.source,
                             precision=ready.precision, engine=ready.engine)
    # under torchrun, or with shards of an earlier sharded run on disk: featx/extract/sharded.py
    sharded = extract_sharded(data, cfg, ready, path=path, prov=prov)
    if sharded is not None:
        return sharded
    return _single_pass(data, cfg, ready, path, prov)


def _check_settings(cfg: ExtractConfig) -> None:
    check_settings(cfg)  # the rules declared beside its fields (featx/config.py)


def _up_to_date(path: Path, prov: dict, overwrite: bool) -> bool:
    """Whether the complete cache at ``path`` already holds what ``prov`` asks for; a cache
    with other inputs is refused, naming what differs, unless ``overwrite``."""
    if not path.exists():
        return False
    try:
        existing = Cache(path).attrs
    except Exception:
        existing = None
    if existing is not None and provenance_covers(existing, prov):
        return True
    if not overwrite:
        diffs = diff_provenance(existing, prov) if existing else ["it is not a readable cache"]
        raise StaleCacheError(f"{path} exists with other inputs ({'; '.join(diffs)}). "
                              f"Pass --overwrite to replace it, or --out another folder.")
    return False


def _single_pass(data: DatasetSpec, cfg: ExtractConfig, ready: RunSetup, path: Path,
                 prov: dict) -> ExtractResult:
    """The whole pass in this process: every split's remaining rows into ``path``."""
    notes: list[str] = []  # a compile fallback is said at the first batch
    frozen = frozen_model(cfg.model, ready, layers=cfg.layers, pools=cfg.pools,
                          keep_map=cfg.keep_map,
                          compile_batch=cfg.batch_size if cfg.compile else None,
                          notes=notes)
    writer = CacheWriter(path, prov, data.splits, dict(frozen.plan.dims), cfg.store,
                         map_dtypes(frozen.plan, cfg))
    notes += writer.notes
    workers = extract_workers(ready.device) if cfg.workers is None else cfg.workers
    workers, note = cap_workers(workers)
    notes += [note] if note else []
    total = sum(len(v) for v in data.splits.values())
    done = sum(writer.next_index(s) for s in data.splits)
    map_size: dict = {}  # (h, w) of the last spatial map, seen by the first batch
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=done, unit="img", desc=f"extract {cfg.model}",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        n_written, skipped = fill_cache(writer, data.root, data.splits, frozen,
                                        batch_size=cfg.batch_size, workers=workers, bar=bar,
                                        map_size=map_size)
    except BaseException:
        writer.close()
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if map_size:
        notes += pool_notes(map_size["hw"], ready.transform.crop, cfg.pools, cfg.model)
    notes += layer_notes(frozen.plan, ready.transform.crop)
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
    skipped_rows = Cache(path).skipped()
    return ExtractResult(path, "resumed" if writer.resumed else "written", n_written,
                         len(skipped_rows), seconds, rate, ready.weights.source, skipped_rows,
                         notes, ready.precision, ready.engine)
