"""Seeded synthetic feature caches of realistic difficulty, written as real featx caches.

Separable blobs finish in a few iterations and prove nothing about a solver, so
:func:`realistic_features` draws rows the way backbone features look to a linear head:
class means in a low-dimensional subspace, correlated (low-rank factor) noise, heavy tails
(a Student-t scale mixture), non-negative like post-ReLU pooled features, and a fraction of
labels flipped at random, so that the best linear head lands around 70-85% accuracy.
:func:`write_feature_cache` writes them with featx's own :class:`~featx.cache.CacheWriter`,
so ``featx fit-heads`` reads the file as a normal cache. Nothing is committed: each run
generates its cache from the seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featx.cache import PROVENANCE_KEYS, CacheWriter

__all__ = ["realistic_features", "write_feature_cache"]

SPLITS = ("train", "val", "test")


def realistic_features(n: int, d: int, classes: int = 10, *, seed: int = 0,
                       separation: float = 0.35, label_noise: float = 0.15,
                       signal_rank: int = 16, noise_rank: int = 32, df: float = 4.0,
                       chunk: int = 8192):
    """Rows of ``d`` features and their labels, in chunks (a 100,000 x 2,048 set never has to
    sit in memory twice).

    Yields ``(X, y)`` with ``X`` of shape (m, d) float32 and ``y`` of shape (m,), m <= chunk,
    rows shuffled over classes. The same ``seed`` gives the same class geometry; each call's
    rows are drawn from ``seed`` too, so two calls with other seeds share the geometry only
    when ``seed`` is the same (use :func:`write_feature_cache`, which draws every split from
    one geometry).
    """
    geo = np.random.default_rng(seed)
    signal = np.linalg.qr(geo.normal(size=(d, signal_rank)))[0].T            # (r, d)
    means = geo.normal(size=(classes, signal_rank)) * separation             # (C, r)
    factors = geo.normal(size=(noise_rank, d)) / np.sqrt(noise_rank) * 1.5   # correlated part
    scales = np.exp(geo.normal(size=d) * 0.5)                                # uneven columns
    offset = geo.uniform(0.5, 1.5, size=d)
    rng = np.random.default_rng([seed, n])
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        y = rng.integers(classes, size=m)
        # Student-t rows: a Gaussian divided by a per-row chi scale (heavy tails, shared per row)
        tail = np.sqrt(rng.chisquare(df, size=(m, 1)) / df)
        noise = (rng.normal(size=(m, noise_rank)) @ factors
                 + rng.normal(size=(m, d))) / tail
        X = (means[y] @ signal) * np.sqrt(d) / 8 + noise
        X = np.log1p(np.exp(X * scales + offset))  # softplus: non-negative, like ReLU maps
        flip = rng.random(m) < label_noise
        y = np.where(flip, rng.integers(classes, size=m), y)
        yield X.astype(np.float32), y.astype(np.int64)


def write_feature_cache(path: Path, n: int, d: int, classes: int = 10, *, seed: int = 0,
                        fractions=(0.7, 0.1, 0.2), feature: str = "penultimate",
                        **kw) -> Path:
    """A finished featx cache at ``path`` of ``n`` rows x ``d`` features, split by
    ``fractions`` over train/val/test, all drawn from one class geometry (``seed``).

    ``kw`` goes to :func:`realistic_features`. Returns the cache's path.
    """
    counts = [int(round(n * f)) for f in fractions]
    counts[-1] = n - sum(counts[:-1])
    # one stream of rows for all splits: the same geometry, rows cut in order
    stream = realistic_features(n, d, classes, seed=seed, **kw)
    names = [f"c{k}" for k in range(classes)]
    chunks: dict[str, list] = {s: [] for s in SPLITS}
    buf_X, buf_y = np.empty((0, d), np.float32), np.empty(0, np.int64)
    for split, k in zip(SPLITS, counts):
        while len(buf_y) < k:
            X, y = next(stream)
            buf_X, buf_y = np.concatenate([buf_X, X]), np.concatenate([buf_y, y])
        chunks[split] = [(buf_X[:k], buf_y[:k])]
        buf_X, buf_y = buf_X[k:], buf_y[k:]
    prov = {key: None for key in PROVENANCE_KEYS}
    prov.update(model="synthetic", weights_sha256="0" * 64, transform={}, precision="fp32",
                store_dtype="float32", classes=names, split_seed=seed, pools=[],
                dataset_fingerprint=f"{seed:064d}"[-64:], features=[feature],
                dataset_name=f"synthetic-{n}x{d}", dataset_root=str(path.parent),
                featx_version="bench")
    items = {s: [(f"{s}/{i:06d}.png", int(lab)) for i, lab in enumerate(chunks[s][0][1])]
             for s in SPLITS}
    writer = CacheWriter(path, prov, items, {feature: d})
    for s in SPLITS:
        X, y = chunks[s][0]
        step = 8192
        for a in range(0, len(y), step):
            writer.append(s, min(a + step, len(y)), {feature: X[a:a + step]}, y[a:a + step],
                          [p for p, _ in items[s][a:a + step]], [])
    return writer.finish({"timings": {"seconds": 0.0, "images_per_s": 0.0}})
