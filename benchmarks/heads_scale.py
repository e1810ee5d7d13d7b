"""Heads at scale: the batched torch trainer vs sklearn, and the wide-feature default.

Two benchmarks of ``python -m benchmarks.run`` (opt-in, ``--only heads_scale,heads_wide``:
minutes each on 2 cores), on seeded synthetic caches of realistic difficulty
(:mod:`benchmarks.synthetic`, generated each run, never committed):

* ``heads_scale``  ``fit_heads(heads=linear,logistic,svm)`` with ``solver="sklearn"`` (jobs
  = cores) and ``solver="torch"`` side by side on the same cache of ``scale_frac`` rows,
  then torch alone on the 100,000 x 2,048 cache. sklearn's time on the full cache is
  extrapolated linearly in the train rows from the fraction: every sklearn solver here costs
  at least linear time in the rows per grid point (lbfgs's matrix products, liblinear's
  passes, ridge's Gram matrix), so the extrapolation is a lower bound and the full-cache
  ratio a conservative one. Each row also says whether the two chose the same grid point
  and by how much their test accuracies differ.
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


def bench_heads_scale(ctx) -> list:
    from benchmarks.run import Row, _fmt_ratio, _met
    s = ctx.settings
    heads = ("logistic", "linear", "svm")
    n_full, n_frac, d = (3000, 1500, 256) if s.quick else (100_000, s.scale_frac, 2048)
    t0 = time.perf_counter()
    full = write_feature_cache(ctx.work / f"syn{n_full}.h5", n_full, d, 10, seed=0)
    frac = write_feature_cache(ctx.work / f"syn{n_frac}.h5", n_frac, d, 10, seed=0)
    gen_s = time.perf_counter() - t0
    import os
    cores = os.cpu_count() or 1
    sk_s, sk = _fit(frac, ctx.work / "sk", heads, solver="sklearn", jobs=cores)
    tf_s, tf = _fit(frac, ctx.work / "tf", heads, solver="torch", jobs=1)
    tfull_s, tfull = _fit(full, ctx.work / "tfull", heads, solver="torch", jobs=1)
    rows = []
    for h in heads:
        a, b = sk[h], tf[h]
        ta, tb = a["timings"]["total_s"], b["timings"]["total_s"]
        step = abs(_grid_index(a) - _grid_index(b))
        dacc = 100 * (b["metrics"]["accuracy"] - a["metrics"]["accuracy"])
        rows.append(Row(
            f"{h} on {n_frac:,} x {d:,} (10 classes): sklearn vs torch, seconds", f"{tb:.1f}",
            f"{ta:.1f}", _fmt_ratio(ta / tb), "informational", "",
            f"chosen {a['selection']['chosen']} vs {b['selection']['chosen']} ({step} grid "
            f"step{'s' if step != 1 else ''} apart), test accuracy sklearn "
            f"{a['metrics']['accuracy']:.4f}, torch {b['metrics']['accuracy']:.4f} "
            f"({dacc:+.2f} pt); sklearn timings {_times(a)}; torch {_times(b)}"))
    train_full = round(n_full * 0.7)
    train_frac = round(n_frac * 0.7)
    sk_full = sk_s * train_full / train_frac
    ratio = sk_full / tfull_s
    rows.append(Row(f"fit-heads logistic,linear,svm on {n_frac:,} x {d:,}: sklearn (jobs "
                    f"{cores}) vs torch, seconds, side by side", f"{tf_s:.1f}", f"{sk_s:.1f}",
                    _fmt_ratio(sk_s / tf_s), ">= 5.00x", _met(sk_s / tf_s >= 5),
                    "the same cache, the same selection on val"))
    rows.append(Row(f"fit-heads logistic,linear,svm on {n_full:,} x {d:,}: torch measured vs "
                    f"sklearn extrapolated from {n_frac:,} rows (linear in rows: a lower "
                    f"bound), seconds", f"{tfull_s:.1f}", f"{sk_full:.0f}",
                    _fmt_ratio(ratio), ">= 5.00x", _met(ratio >= 5),
                    f"torch on the full cache: "
                    + "; ".join(f"{h} {tfull[h]['timings']['total_s']:.1f} s, chosen "
                                f"{tfull[h]['selection']['chosen']}, test accuracy "
                                f"{tfull[h]['metrics']['accuracy']:.4f}" for h in heads)
                    + f"; caches generated in {gen_s:.0f} s"))
    return rows


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
