"""The digits image set, written as image files: real 8x8 scans of handwritten digits (UCI,
shipped with scikit-learn), so the demo, the tests and the benchmarks have a real image folder
without a download. The one writer of it: every caller takes its images from here.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

__all__ = ["write_digits_dataset"]


def write_digits_dataset(root: str | Path, *, per_class: int | None = None, size: int = 32,
                         classes: tuple[int, ...] = tuple(range(10)), seed: int = 0,
                         split: tuple[float, float, float] | None = None) -> Path:
    """Write digits as ``root/digit{c}/{index}.png`` (``size`` x ``size`` pixels), once.

    Parameters
    ----------
    root : path
        Target folder; if it already holds the same selection (a marker file records it),
        nothing is rewritten.
    per_class : int or None, default None
        Images per class (all of them, about 180, when None).
    size : int, default 32
        Side in pixels after bilinear upscaling from 8x8.
    classes : tuple of int, default 0..9
        Which digits to include.
    seed : int, default 0
        Which ``per_class`` images are taken (and, with ``split``, which go where).
    split : (train, val, test) fractions or None, default None
        None: class folders, split later by featx. Fractions: ``root/{train,val,test}/digit{c}``
        folders instead; of each class's images in seeded order, the first ``train`` share go
        to train, the next ``val`` share to val, the rest to test.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    marker = root / ".featx-digits"
    key = f"per_class={per_class} size={size} classes={list(classes)} seed={seed}"
    key += (f" split={list(split)}" if split is not None else "") + "\n"
    if marker.is_file() and marker.read_text() == key:
        return root
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c in classes:
        idx = np.flatnonzero(digits.target == c)
        if per_class is not None or split is not None:
            idx = rng.permutation(idx)[:per_class]
        if split is None:
            folders = {tmp / f"digit{c}": np.sort(idx)}
        else:  # by rank in the seeded order; round() so 0.6 + 0.2 of 30 is 24, not 25
            n_train = math.ceil(round(split[0] * len(idx), 6))
            n_trval = math.ceil(round((split[0] + split[1]) * len(idx), 6))
            folders = {tmp / "train" / f"digit{c}": np.sort(idx[:n_train]),
                       tmp / "val" / f"digit{c}": np.sort(idx[n_train:n_trval]),
                       tmp / "test" / f"digit{c}": np.sort(idx[n_trval:])}
        for folder, rows in folders.items():
            folder.mkdir(parents=True, exist_ok=True)
            for i in rows:
                img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8), "L")
                img.resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")
    (tmp / ".featx-digits").write_text(key)
    if root.exists():
        import shutil
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
