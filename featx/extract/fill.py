"""The one fill loop: decode a split's remaining files, run the frozen model, commit rows.

Both the single-process pass (:mod:`~featx.extract.single`) and each torchrun shard
(:mod:`~featx.extract.sharded`) fill their cache file through :func:`fill_cache`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from featx.backbones import FrozenModel
from featx.cache import CacheWriter
from featx.data.images import ImageFiles

__all__ = ["ExtractResult", "fill_cache"]


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
    engine: str = ""  # what --engine auto resolved to


def fill_cache(writer: CacheWriter, root, splits: dict, frozen: FrozenModel, *,
               batch_size: int, workers: int, bar, map_size: dict | None = None,
               after_commit=None) -> tuple[int, list]:
    """Extract the rows of ``splits`` that ``writer`` has not committed, batch by batch:
    every feature of ``frozen.plan`` from one forward per batch.

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
            feats = frozen.features(images, map_size=map_size)
            ok = np.array([e == "" for e in errors])
            bad = [(items[i][0], e) for i, e in zip(idx.tolist(), errors) if e]
            # only the stored features: aliases (pool1 = penultimate, ...) are the same arrays
            writer.append(split, int(idx[-1]) + 1,
                          {k: v[ok] for k, v in feats.items() if k in writer.dims},
                          labels.numpy()[ok], [items[i][0] for i in idx[ok].tolist()], bad)
            if after_commit is not None:
                after_commit()
            written += int(ok.sum())
            skipped += [(split, p, e) for p, e in bad]
            bar.update(len(labels))
    return written, skipped
