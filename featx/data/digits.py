"""The digits image set, written as image files: real 8x8 scans of handwritten digits (UCI,
shipped with scikit-learn), so the demo, the tests and the benchmarks have a real image folder
without a download. The one writer of it: every caller takes its images from here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["write_digits_dataset"]


def write_digits_dataset(root: str | Path, *, per_class: int | None = None, size: int = 32,
                         classes: tuple[int, ...] = tuple(range(10)), seed: int = 0) -> Path:
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
        Which ``per_class`` images are taken.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root)
    marker = root / ".featx-digits"
    key = f"per_class={per_class} size={size} classes={list(classes)} seed={seed}\n"
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
        if per_class is not None:
            idx = np.sort(rng.permutation(idx)[:per_class])
        (tmp / f"digit{c}").mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8), "L")
            img.resize((size, size), Image.BILINEAR).save(tmp / f"digit{c}" / f"{i:04d}.png")
    (tmp / ".featx-digits").write_text(key)
    if root.exists():
        import shutil
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root
