"""Heads at scale: the batched torch trainer vs sklearn, and the wide-feature default.

Two benchmarks of ``python -m benchmarks.run`` (opt-in, ``--only heads_scale,heads_wide``:
minutes each on 2 cores), on seeded synthetic caches of realistic difficulty
(:mod:`benchmarks.synthetic`, generated each run, never committed):

* ``heads_scale``  ``fit_heads(heads=linear,logistic,svm)`` with ``solver="torch"`` and then
  ``solver="sklearn"`` (jobs = cores) side by side on the same 100,000 x 2,048 cache. sklearn's
  linear and logistic heads are measured whole; its svm (liblinear) ran for hours, so one of
  its grid points is timed in a child process under ``svm_point_limit_s`` and five times that
  is the lower bound of its grid. Each row also says whether the two chose the same grid
  point and by how much their test accuracies differ.
* ``heads_wide``   all four default heads on a 131,072-wide cache of a few hundred rows:
  full width (``wide_pca=0``) vs the default wide path (PCA fitted on train).
"""
from __future__ import annotations

import time
from pathlib import Path

from benchmarks.synthetic import write_feature_cache

__all__ = ["bench_heads_scale", "bench_heads_wide"]


def _fit(cache: Path, out: Path, heads, **cfg) -> tuple[float, dict]:
    """Wall seconds of one ``fit_heads`` call, and its results by head."""
    from featx.config import HeadsConfig
    from featx.heads import fit_heads
    t0 = time.perf_counter()
    run = fit_heads([cache], HeadsConfig(heads=tuple(heads), out_dir=out, refit=True, **cfg))
    return time.perf_counter() - t0, {r["head"]: r for r in run.results}


def _grid_index(res: dict) -> int:
    key, value = next(iter(res["selection"]["chosen"].items()))
    return [g["params"][key] for g in res["selection"]["grid"]].index(value)


def _svm_point_seconds(cache: Path, C: float, limit_s: float) -> float | None:
    """Seconds sklearn's svm head (StandardScaler + LinearSVC, as fit-heads builds it) takes
    to fit one grid point on the cache's train rows, or None when it runs past ``limit_s``
    (the fit runs in a child process that is then killed)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_svm_point_child, args=(str(cache), C, q), daemon=True)
    proc.start()
    proc.join(limit_s)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return None
    if proc.exitcode != 0:  # a crash is not "too slow": say so rather than wait on the queue
        raise RuntimeError(f"sklearn's svm grid point exited with code {proc.exitcode}")
    return q.get(timeout=60)


def _svm_point_child(cache: str, C: float, q) -> None:
    from featx.cache import Cache
    from featx.heads.registry import build_head
    c = Cache(cache)
    X, y = c.load("train", "penultimate"), c.labels("train")
    t0 = time.perf_counter()
    build_head("svm", params={"C": C}).fit(X, y)
    q.put(time.perf_counter() - t0)


def bench_heads_scale(ctx) -> list:
    """Side by side in one run on the same 100,000 x 2,048 cache: the batched torch trainer,
    then sklearn (linear and logistic measured whole; svm: liblinear took hours, so one grid
    point is timed under a limit and five of it are the lower bound of its grid)."""
    from benchmarks.run import Row, _fmt_ratio, _met
    s = ctx.settings
    heads = ("logistic", "linear", "svm")
    n, d = (3000, 256) if s.quick else (100_000, 2048)
    t0 = time.perf_counter()
    cache = write_feature_cache(ctx.work / f"syn{n}.h5", n, d, 10, seed=0)
    gen_s = time.perf_counter() - t0
    import os
    cores = os.cpu_count() or 1
    tf_s, tf = _fit(cache, ctx.work / "tf", heads, solver="torch", jobs=1)
    sk_s, sk = _fit(cache, ctx.work / "sk", ("logistic", "linear"), solver="sklearn",
                    jobs=cores)
    svm_values = get_head_grid("svm")
    point_s = _svm_point_seconds(cache, svm_values[0], s.svm_point_limit_s)
    rows = []
    for h in ("logistic", "linear"):
        a, b = sk[h], tf[h]
        ta, tb = a["timings"]["total_s"], b["timings"]["total_s"]
        step = abs(_grid_index(a) - _grid_index(b))
        dacc = 100 * (b["metrics"]["accuracy"] - a["metrics"]["accuracy"])
        ok = ta / tb >= 5 and step <= 1 and abs(dacc) <= 0.5
        rows.append(Row(
            f"{h} on {n:,} x {d:,} (10 classes): torch vs sklearn (jobs {cores}), seconds",
            f"{tb:.1f}", f"{ta:.1f}", _fmt_ratio(ta / tb), ">= 5.00x, same point +-1, "
            "+-0.5 pt", _met(ok),
            f"chosen {a['selection']['chosen']} vs {b['selection']['chosen']} ({step} grid "
            f"step{'s' if step != 1 else ''} apart), test accuracy sklearn "
            f"{a['metrics']['accuracy']:.4f}, torch {b['metrics']['accuracy']:.4f} "
            f"({dacc:+.2f} pt); sklearn timings {_times(a)}; torch {_times(b)}"))
    tsvm = tf["svm"]["timings"]["total_s"]
    if point_s is None:
        bound, how = len(svm_values) * s.svm_point_limit_s, (
            f"one grid point (C {svm_values[0]}) ran past {s.svm_point_limit_s:.0f} s")
    else:
        bound, how = len(svm_values) * point_s, (
            f"one grid point (C {svm_values[0]}, the strongest penalty) took {point_s:.1f} s")
    rows.append(Row(
        f"svm on {n:,} x {d:,}: torch vs sklearn's {len(svm_values)}-point grid (a lower "
        f"bound: {len(svm_values)} x one point), seconds", f"{tsvm:.1f}", f"> {bound:.0f}",
        f"> {_fmt_ratio(bound / tsvm)}", ">= 5.00x", _met(bound / tsvm >= 5),
        f"{how}; torch chose {tf['svm']['selection']['chosen']}, test accuracy "
        f"{tf['svm']['metrics']['accuracy']:.4f}; torch {_times(tf['svm'])}"))
    t_lin = sum(tf[h]["timings"]["total_s"] for h in ("logistic", "linear"))
    s_lin = sum(sk[h]["timings"]["total_s"] for h in ("logistic", "linear"))
    rows.append(Row(
        f"fit-heads logistic,linear,svm on {n:,} x {d:,}: torch whole run vs sklearn "
        f"(logistic + linear measured, svm bound), seconds", f"{tf_s:.1f}",
        f"> {s_lin + bound:.0f}", f"> {_fmt_ratio((s_lin + bound) / tf_s)}", ">= 5.00x",
        _met((s_lin + bound) / tf_s >= 5),
        f"logistic + linear alone: torch {t_lin:.1f} s, sklearn {s_lin:.1f} s "
        f"({_fmt_ratio(s_lin / t_lin)}); cache generated in {gen_s:.0f} s"))
    return rows


def get_head_grid(head: str) -> list[float]:
    from featx.heads.registry import get_head
    return [float(v) for v in next(iter(get_head(head).grid.values()))]


def _times(res: dict) -> str:
    t = res["timings"]
    return ", ".join(f"{k[:-2]} {t[k]:.1f}" for k in ("load_s", "select_s", "fit_s",
                                                        "predict_s") if k in t)


def bench_heads_wide(ctx) -> list:
    from benchmarks.run import Row, _fmt_ratio
    s = ctx.settings
    heads = ("linear", "logistic", "svm", "mlp")
    n, d = (120, 16_384) if s.quick else (s.wide_rows, 131_072)
    cache = write_feature_cache(ctx.work / f"wide{n}.h5", n, d, 2, seed=1,
                                fractions=(0.4, 0.2, 0.4), separation=1.2)
    before_s, before = _fit(cache, ctx.work / "full", heads, wide_pca=0, jobs=1)
    after_s, after = _fit(cache, ctx.work / "pca", heads, jobs=1)
    k = after[heads[0]]["settings"]["memory"]["pca_components"]
    detail = "; ".join(
        f"{h}: {before[h]['timings']['total_s']:.1f} s -> {after[h]['timings']['total_s']:.1f}"
        f" s, test balanced accuracy {before[h]['metrics']['balanced_accuracy']:.3f} -> "
        f"{after[h]['metrics']['balanced_accuracy']:.3f}" for h in heads)
    return [Row(f"fit-heads {','.join(heads)} on {n} rows x {d:,} (train {round(n * 0.4)}): "
                f"full width vs the wide path (PCA to {k} on train), seconds", f"{after_s:.1f}",
                f"{before_s:.1f}", _fmt_ratio(before_s / after_s), "informational", "",
                detail)]
