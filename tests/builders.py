"""Shared builders for the tests (and nothing else): real caches of known structure, the
digits image set, result files for the report, and the tolerant comparison of results that
crossed a process, thread or backend boundary. Plain functions, imported as
``from tests.builders import ...``; the fixtures that use them live in conftest.py.
"""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import h5py
import numpy as np

from featx.cache import PROVENANCE_KEYS, CacheWriter
from featx.data import dataset_fingerprints
from featx.data.digits import write_digits_dataset
from featx.metrics import classification_metrics
from featx.results import make_result, read_result, write_json

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PNEUMONIA = SHARED_DATA / "pneumoniamnist"

CLASSES = ["alpha", "beta", "gamma"]

# Floating results computed in another process, thread split or backend (loky/dask/ray
# workers, torchrun ranks): float32 reductions summed in another order or with another BLAS
# thread count differ in the last bits (1.2e-7 seen between a dask worker and --jobs 1 on an
# AVX2-only machine), so they are compared to rtol 1e-5 / atol 1e-6: ~100x that noise, far
# below any real change (a flipped prediction moves an accuracy by >= 1/n_test).
CROSS_RTOL, CROSS_ATOL = 1e-5, 1e-6


# --- the CLI ---------------------------------------------------------------------------------

def invoke_cli(*args, **kw):
    """The one CLI runner: ``featx ARGS`` in this process through click's CliRunner (each
    argument through str(); ``kw`` to ``invoke``: env, input...). Returns click's Result.
    Also the ``cli`` fixture (conftest.py)."""
    from click.testing import CliRunner

    from featx.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


# --- the digits image set ---------------------------------------------------------------------

def write_digits(root: Path, *, classes=(0, 1, 2), per_class: int = 30, size: int = 32,
                 layout: str = "folders", seed: int = 0) -> Path:
    """scikit-learn's digits written by featx's one writer (featx.data.digits).

    ``layout``: ``"folders"`` (root/CLASS/*.png) or ``"split"`` (root/{train,val,test}/CLASS,
    0.6/0.2/0.2 of each class).
    """
    if layout not in ("folders", "split"):
        raise ValueError(f"layout {layout!r}: folders or split")
    return write_digits_dataset(root, per_class=per_class, size=size, classes=tuple(classes),
                                seed=seed, split=(0.6, 0.2, 0.2) if layout == "split" else None)


# --- caches of known structure ----------------------------------------------------------------

def write_cache(path: Path, splits: dict, classes=CLASSES, *, finish: bool = True) -> Path:
    """A featx cache written by CacheWriter. ``splits``: {split: ({feature: X}, y)}."""
    first = next(iter(splits.values()))[0]
    dims = {name: X.shape[1] for name, X in first.items()}
    prov = {key: None for key in PROVENANCE_KEYS}
    prov.update(model="synthetic", weights_sha256="0" * 64, transform={}, precision="fp32",
                store_dtype="float32", classes=list(classes), split_seed=0,
                pools=sorted(int(k[4:]) for k in dims if k.startswith("pool")),
                dataset_fingerprint="f" * 64, features=list(dims), dataset_name="blobs",
                dataset_root=str(path.parent), featx_version="0.1.0")
    items = {s: [(f"{s}/{i:04d}.png", int(lab)) for i, lab in enumerate(y)]
             for s, (_, y) in splits.items()}
    writer = CacheWriter(path, prov, items, dims)
    for s, (feats, y) in splits.items():
        writer.append(s, len(y), feats, np.asarray(y), [p for p, _ in items[s]], [])
    if not finish:
        writer.close()
        return writer.tmp
    return writer.finish({"timings": {"seconds": 7.5, "images_per_s": 40.0}})


def blobs(rng, n_per_class, centers, noise=1.0):
    """Gaussian blobs around ``centers`` (k, d), rows sorted by class like a real cache."""
    y = np.repeat(np.arange(len(centers)), n_per_class)
    X = centers[y] + noise * rng.normal(size=(len(y), centers.shape[1]))
    return X.astype(np.float32), y


def blob_splits(seed=0, d=24, n=(40, 15, 30), sep=2.5, val=True, classes=3, pools=(1, 2)):
    """train/val/test of separable blobs, with penultimate and pool{n} features."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, d)) * sep / np.sqrt(d) * 2
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        if split == "val" and not val:
            continue
        X, y = blobs(rng, k, centers)
        feats = {"penultimate": X}
        for p in pools:  # a wider, noisier copy, like a larger pooled map
            feats[f"pool{p}"] = np.tile(X, (1, p * p)) + rng.normal(size=(len(y), d * p * p)
                                                                    ).astype(np.float32)
        out[split] = (feats, y)
    return out


def h5_datasets(path) -> dict:
    """{name: array} of every dataset in an HDF5 file."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset)
                     else None)
    return out


# --- result files for the report --------------------------------------------------------------

TILES = ("ADI", "LYM", "TUM")
XRAY = ("NORMAL", "PNEUMONIA")
EXTRACT_S = 120.0  # the tiles resnet18 cache's whole extraction pass


def split_files(classes, n, prefix, seed=0):
    rng = np.random.default_rng(seed)
    return [(f"{classes[i % len(classes)]}/{prefix}{i:04d}.png", i % len(classes))
            for i in rng.permutation(n)]


def dataset_record(name, classes, *, test_seed=0, train_seed=0):
    splits = {"train": split_files(classes, 90, "tr", train_seed),
              "val": split_files(classes, 30, "va"),
              "test": split_files(classes, 60, "te", test_seed)}
    return {"name": name, "root": f"/data/{name}", "classes": list(classes),
            "fingerprint": "f" * 64, **dataset_fingerprints(splits)}


def metrics_with_mistakes(classes, wrong_per_class, *, scores=True):
    """Real metrics from 20 test images per class with ``wrong_per_class[c]`` mistakes."""
    k = len(classes)
    y_true, y_pred = [], []
    for c, wrong in enumerate(wrong_per_class):
        y_true += [c] * 20
        y_pred += [(c + 1) % k] * wrong + [c] * (20 - wrong)
    score = np.eye(k)[y_pred] * 0.8 + 0.2 / k if scores else None
    return classification_metrics(y_true, y_pred, score, classes)


def write_head_result(root, dataset, feature, head, wrong, *,
                      cache="tiles_resnet18_imagenet_224", created="2024-05-01T10:00:00",
                      fit_s=2.0, extract_s=EXTRACT_S, model="resnet18", scores=True):
    m = metrics_with_mistakes(dataset["classes"], wrong, scores=scores)
    t = {"extract_s": extract_s, "load_s": 0.3, "select_s": 4 * fit_s, "fit_s": fit_s,
         "predict_s": 0.05}
    t["total_s"] = sum(t.values())
    res = make_result(kind="head", method=f"{head} @ {feature}", dataset=dataset, model=model,
                      metrics=m, timings=t, feature=feature, head=head,
                      provenance={"created": created, "model": model},
                      artifacts={"model": f"{feature}__{head}.skops",
                                 "cache": f"/cache/{cache}.h5"})
    return write_json(root / cache / "heads" / f"{feature}__{head}.json", res)


# --- comparing results across processes -------------------------------------------------------

def comparable_results(out: Path) -> dict:
    """{file: (metrics without timings, selection)} of every result under ``out``."""
    found = {}
    for path in sorted(Path(out).rglob("*.json")):
        r = read_result(path)
        metrics = {k: v for k, v in r["metrics"].items() if not k.endswith("_s")}
        found[path.relative_to(out).as_posix()] = (metrics, r["selection"])
    return found


def assert_close_results(got, expected, *, rtol=CROSS_RTOL, atol=CROSS_ATOL, where="result"):
    """``got == expected`` for nested dicts/lists/tuples, floats within ``rtol``/``atol``
    (see CROSS_RTOL), everything else (keys, ints, strings, bools, None) exactly.

    Counts, confusion matrices, chosen hyperparameters stay exact: the blob and digit fixtures
    are separated far beyond 1e-6, so no prediction sits that close to a tie and a last-bit
    difference cannot flip one; if one flips, that is a real difference and fails here."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (where, got, expected)
        for k in expected:
            assert_close_results(got[k], expected[k], rtol=rtol, atol=atol, where=f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), (where, got,
                                                                              expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close_results(g, e, rtol=rtol, atol=atol, where=f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)), (where, got, expected)
        assert (math.isnan(got) and math.isnan(expected)) or math.isclose(
            got, expected, rel_tol=rtol, abs_tol=atol), (where, got, expected)
    else:
        assert got == expected, (where, got, expected)


# --- what bad input must give ------------------------------------------------------------------

def assert_one_line_error(result, *needles):
    """A click result that failed with exactly one ``Error:`` line (holding each of
    ``needles``) and no traceback."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for n in needles:
        assert n in errors[0], errors[0]


class _Payload:
    """Unpickling this creates the file ``marker``: what a 60-byte attacker's pickle does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def malicious_pickle(marker) -> bytes:
    """A pickle whose payload, if it ever ran, would create ``marker``."""
    return pickle.dumps(_Payload(marker), protocol=2)


# --- fine-tuning -------------------------------------------------------------------------------

def small_finetune_config(out, **kw):
    """The fine-tuning tests' small run (resnet18, random init, 32 px, 2 epochs, adam), with
    ``kw`` replacing any field."""
    from featx.config import FinetuneConfig
    base = dict(model="resnet18", weights="none", image_size=32, epochs=2, batch_size=16,
                optimizer="adam", lr=1e-3, workers=0, out_dir=out, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def load_checkpoint(path) -> dict:
    """A featx checkpoint (best.pt / last.pt) as featx reads it: tensors only."""
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)
