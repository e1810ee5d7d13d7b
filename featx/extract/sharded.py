"""Extraction split across ``torchrun`` processes, joined into one ordinary cache.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) every process
runs the same ``featx extract`` command. The images are cut into K shards by index: shard
``k`` of ``K`` holds, of every split with ``n`` files, the files ``[k*n//K, (k+1)*n//K)``:
contiguous, disjoint, together exactly the split, with no padding (unlike
``DistributedSampler``). Process ``r`` of ``W`` works on shards ``r, r+W, r+2W, ...``, each a
normal cache file of its own (written through :class:`~featx.cache.CacheWriter`, so it
commits batch by batch and a killed process resumes from its last committed batch)::

    cache/NAME.h5.shards/shard-00000-of-00002.h5[.partial]
    cache/NAME.h5.shards/shard-00001-of-00002.h5[.partial]

When every shard is complete, rank 0 copies them in order into ``NAME.h5.partial`` and
renames it to ``NAME.h5`` (``os.replace``), then deletes the shard folder. The result is
byte-for-byte the layout a single process writes: one self-contained file.

Shards are keyed by their row range, not by who wrote them: K is fixed by the first run
(its world size) and kept by every later run, whatever its world size, so 2 processes can
start a cache and 1 process (a plain ``featx extract``), or 4, can finish it; a partial
single-process cache picked up by ``torchrun`` becomes shard 0 of 1.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import time
from pathlib import Path

import h5py
import torch
from tqdm.auto import tqdm

from featx.backbones import RunSetup, feature_dims, frozen_model
from featx.cache import (
    SCHEMA_VERSION,
    Cache,
    CacheWriter,
    diff_provenance,
    partial_path,
    read_attrs,
)
from featx.distributed import DistEnv, all_gather_object, dist_env, init_process_group, run_on_main
from featx.extract.fill import ExtractResult, fill_cache
from featx.features import MAP, layer_of
from featx.runtime import extract_workers

__all__ = ["extract_sharded", "shard_bounds", "shard_dir", "shard_path"]

_SHARD_RE = re.compile(r"shard-(\d{5})-of-(\d{5})\.h5(\.partial)?$")
_JOIN_BYTES = 64 << 20  # rows copied per block when joining shards
# Test hook: "RANK:N" makes that rank SIGKILL itself after committing N batches, so tests can
# kill one rank at a known point instead of racing a timer.
_KILL_ENV = "FEATX_TEST_KILL_AFTER_BATCHES"


def shard_dir(path: str | Path) -> Path:
    """``cache/NAME.h5`` -> ``cache/NAME.h5.shards``: where its shards live while unjoined."""
    path = Path(path)
    return path.with_name(path.name + ".shards")


def shard_path(path: str | Path, k: int, n_shards: int) -> Path:
    """The file of shard ``k`` of ``n_shards`` of the cache ``path``."""
    return shard_dir(path) / f"shard-{k:05d}-of-{n_shards:05d}.h5"


def shard_bounds(n: int, k: int, n_shards: int) -> tuple[int, int]:
    """``(lo, hi)``: shard ``k``'s slice of a split of ``n`` files (sizes differ by <= 1)."""
    return k * n // n_shards, (k + 1) * n // n_shards


def _shard_splits(splits: dict, k: int, n_shards: int) -> dict:
    return {s: items[slice(*shard_bounds(len(items), k, n_shards))]
            for s, items in splits.items()}


def _init(env: DistEnv, device: torch.device) -> torch.device:
    """Join the process group (gloo on the CPU, NCCL on GPUs); this rank's device."""
    if env.world_size > 1:
        init_process_group(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env.local_rank)
    return device


# -- which shards ---------------------------------------------------------------------------

def _plan(path: Path, prov: dict, world_size: int) -> int | None:
    """The number of shards to work on (K), settling what is on disk; ``None``: no sharding.

    Shards with the same inputs keep their K; an unreadable shard file is only lost work
    and is removed (that shard starts over); shards from other inputs are removed as a
    whole, as a stale ``.partial`` is today.
    """
    folder = shard_dir(path)
    found: dict[Path, int] = {}
    stale = False
    for f in sorted(folder.glob("shard-*")) if folder.is_dir() else []:
        m = _SHARD_RE.fullmatch(f.name)
        if not m:
            continue
        same = _same_inputs(f, prov)
        if same is None:
            f.unlink()
            continue
        stale |= not same
        found[f] = int(m.group(2))
    if stale or len(set(found.values())) > 1:
        shutil.rmtree(folder)
        found = {}
    if found:
        return next(iter(found.values()))
    if folder.is_dir():
        shutil.rmtree(folder)
    if world_size == 1:
        return None  # nothing sharded to finish: the ordinary single-process path
    single = partial_path(path)
    if _same_inputs(single, prov):
        # one row range, finished by one rank: its committed rows are kept, not redone
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(single, partial_path(shard_path(path, 0, 1)))
        return 1
    return world_size


def _same_inputs(path: Path, prov: dict) -> bool | None:
    """Whether the (shard or partial) cache file ``path`` has ``prov``'s inputs; ``None``
    when it cannot be read."""
    try:
        with h5py.File(path, "r") as h:
            attrs = read_attrs(h)
    except OSError:
        return None
    return attrs.get("featx_schema") == SCHEMA_VERSION and not diff_provenance(attrs, prov)


def _map_dtypes(dims: dict, cfg) -> dict:
    """``{kept map: --map-store dtype}``, as the single-process pass stores them."""
    return {name: cfg.map_store for name in dims if layer_of(name)[1] == MAP}


# -- the pass over one shard ----------------------------------------------------------------

_committed = {"batches": 0}


def _after_commit(rank: int) -> None:
    spec = os.environ.get(_KILL_ENV)
    if not spec:
        return
    want_rank, _, n = spec.partition(":")
    _committed["batches"] += 1
    if int(want_rank) == rank and _committed["batches"] >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


# -- joining --------------------------------------------------------------------------------

def _join(path: Path, prov: dict, splits: dict, n_shards: int, dims: dict, store: str,
          extra: dict, dtypes: dict | None = None) -> float:
    """Copy the complete shards, in order, into one cache file at ``path`` (atomic rename),
    then remove them; returns the seconds it took.

    Rows, the skipped list and the full split lists come out in the order one process
    writes them: split by split, and within a split shard by shard.
    """
    t0 = time.perf_counter()
    partial_path(path).unlink(missing_ok=True)  # a join killed half-way starts over
    writer = CacheWriter(path, prov, splits, dims, store, dtypes)
    block = max(1, _JOIN_BYTES // (4 * sum(dims.values())))
    try:
        for split, items in splits.items():
            for k in range(n_shards):
                lo, hi = shard_bounds(len(items), k, n_shards)
                with h5py.File(shard_path(path, k, n_shards), "r") as f:
                    g, s = f[split], f["skipped"]
                    bad = [(p, r) for sp, p, r in zip(s["split"].asstr()[:], s["path"].asstr()[:],
                                                       s["reason"].asstr()[:]) if sp == split]
                    n = g["labels"].shape[0]
                    starts = list(range(0, n, block)) or [0]
                    for a in starts:
                        b = min(n, a + block)
                        last = a == starts[-1]
                        # next_index moves to hi only with the shard's last block: a join
                        # killed in between never claims rows it has not copied
                        writer.append(split, hi if last else lo,
                                      {name: g[name][a:b] for name in dims},
                                      g["labels"][a:b], list(g["paths"].asstr()[a:b]),
                                      bad if last else [])
    except BaseException:
        writer.close()
        raise
    writer.finish(extra)
    # the cache is complete from here; a shard left behind is only wasted disk
    shutil.rmtree(shard_dir(path), ignore_errors=True)
    return time.perf_counter() - t0


# -- the entry point ------------------------------------------------------------------------

def extract_sharded(data, cfg, ready: RunSetup, *, path: Path, prov: dict):
    """Run :func:`featx.extract.extract`'s pass as one of ``torchrun``'s processes, or
    finish shards left on disk; ``None`` when neither applies (a plain single-process run).

    Every rank returns an :class:`~featx.extract.ExtractResult` for the final cache ``path``;
    rank 0's counts cover all ranks, another rank's its own shards.
    """
    env = dist_env()
    if env.world_size == 1 and not shard_dir(path).is_dir():
        return None
    ready = dataclasses.replace(ready, device=_init(env, ready.device))
    t0 = time.perf_counter()
    prov = {**prov, "device": str(ready.device), "world_size": env.world_size}
    n_shards = run_on_main(lambda: _plan(path, prov, env.world_size))
    if n_shards is None:
        return None
    dims = feature_dims(cfg.model, cfg.pools, cfg.layers, ready.transform.crop, cfg.keep_map)
    dtypes = _map_dtypes(dims, cfg)
    mine = [k for k in range(env.rank, n_shards, env.world_size)
            if not shard_path(path, k, n_shards).exists()]
    notes: list[str] = []
    written, skipped, resumed, seconds = _fill_shards(data, cfg, ready, path, prov, env, mine,
                                                      n_shards, dims, notes)
    resumed |= len(mine) < len(range(env.rank, n_shards, env.world_size))
    counts = all_gather_object((written, skipped, resumed, seconds))  # waits for every shard
    if env.rank == 0:
        n_all, n_bad = sum(c[0] for c in counts), sum(c[1] for c in counts)
        # the ranks run side by side: the job's pass takes as long as its slowest rank
        seconds = max(c[3] for c in counts)
    else:
        n_all, n_bad = written, skipped
    resumed = any(c[2] for c in counts)
    timings = {"seconds": round(seconds, 3),
               "images_per_s": round((n_all + n_bad) / max(seconds, 1e-9), 2),
               "wall_s": round(time.perf_counter() - t0, 3),
               "resumed": resumed, "images": n_all,
               "world_size": env.world_size, "shards": n_shards}
    # rank 0 joins; the final file exists (or the join's error is raised) on every rank
    join_s = run_on_main(lambda: _join(path, {**prov, "shard_count": n_shards}, data.splits,
                                       n_shards, dims, cfg.store, {"timings": timings},
                                       dtypes))
    if env.rank == 0:
        notes.append(f"{env.world_size} process(es) extracted {n_shards} shard(s); rank 0 "
                     f"joined them in {join_s:.1f} s.")
    else:
        notes.append(f"rank {env.rank}/{env.world_size}: extracted shard(s) "
                     f"{', '.join(map(str, mine)) or '(none left)'} of {n_shards}; rank 0 "
                     f"joins them into {path.name}.")
    skipped_rows = Cache(path).skipped()
    return ExtractResult(path, "resumed" if resumed else "written", n_all,
                         len(skipped_rows) if env.rank == 0 else n_bad,
                         seconds, (n_all + n_bad) / seconds if seconds > 0 else 0.0,
                         ready.weights.source, skipped_rows if env.rank == 0 else [], notes,
                         ready.precision, ready.engine)


def _fill_shards(data, cfg, ready: RunSetup, path: Path, prov: dict, env: DistEnv,
                 mine: list[int], n_shards: int, dims: dict, notes: list[str]
                 ) -> tuple[int, int, bool, float]:
    """This rank's shards ``mine``, each its own cache file; ``(written, skipped, resumed,
    seconds in the pass)``."""
    total = sum(hi - lo for k in mine for items in data.splits.values()
                for lo, hi in [shard_bounds(len(items), k, n_shards)])
    written = skipped = 0
    resumed = False
    seconds = 0.0  # in the pass itself, as a single process's timings count it
    bar = tqdm(total=total, unit="img", dynamic_ncols=True,
               desc=f"extract {cfg.model} [rank {env.rank}/{env.world_size}]",
               disable=not cfg.progress or env.rank != 0)
    frozen = None
    workers = extract_workers(ready.device) if cfg.workers is None else cfg.workers
    try:
        for k in mine:
            if frozen is None:  # built only when this rank has work
                frozen = frozen_model(cfg.model, ready, notes=notes, layers=cfg.layers,
                                      pools=cfg.pools, keep_map=cfg.keep_map,
                                      compile_batch=cfg.batch_size if cfg.compile else None)
            t_shard = time.perf_counter()
            splits = _shard_splits(data.splits, k, n_shards)
            writer = CacheWriter(shard_path(path, k, n_shards),
                                 {**prov, "shard_index": k, "shard_count": n_shards},
                                 splits, dims, cfg.store, _map_dtypes(dims, cfg))
            resumed |= writer.resumed
            bar.update(sum(writer.next_index(s) for s in splits))
            try:
                n_ok, bad = fill_cache(writer, data.root, splits, frozen,
                                       batch_size=cfg.batch_size, workers=workers, bar=bar,
                                       after_commit=lambda: _after_commit(env.rank))
            except BaseException:
                writer.close()
                raise
            written, skipped = written + n_ok, skipped + len(bad)
            seconds += time.perf_counter() - t_shard
            writer.finish({"timings": {"seconds": round(time.perf_counter() - t_shard, 3)}})
    finally:
        bar.close()
    return written, skipped, resumed, seconds
