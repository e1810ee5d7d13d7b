"""Applying a finished result to new images, with the backbone and transform it recorded.

A head result (``fit-heads``) links everything needed: its ``provenance`` is the cache's (model,
weights and their sha256, transform, precision), and its fitted pipeline sits beside it
(``artifacts.model``, a ``.skops``, with its sha256 as ``artifacts.model_sha256``). A
fine-tuning result names its best checkpoint (``best.pt``, sha256 recorded the same way),
which holds the whole network. :func:`~featx.apply.predictor.load_predictor` rebuilds
either one and refuses, with one line, when what it would run is not what produced the result
(other weights, another model, a checkpoint of another run). This module finds the new images
(:func:`find_images`), streams them through it batch by batch (:func:`predict_batches`) and
writes ``predictions.csv`` atomically (:func:`predict`).
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

# what runs (re-exported: `from featx.predict import load_predictor` keeps working)
from featx.apply.predictor import Predictor, load_predictor
from featx.data import IMAGE_EXTENSIONS, DataError, DataParameterError
from featx.data.images import ImageFiles
from featx.errors import ParameterError
from featx.files import atomic_write
from featx.metrics import classification_metrics
from featx.results import write_json

__all__ = ["NewImages", "PredictRun", "find_images", "predict", "predict_batches", "write_predictions"]



# --- new images -------------------------------------------------------------------------------

@dataclass
class NewImages:
    """Images to predict: ``items`` are ``(path, label)`` with label ``-1`` when unknown.

    ``path`` is as the user can find it: ``FOLDER/relative/path``, a manifest's ``path``
    joined to the manifest's folder, or a file as given. ``labelled`` is true when every image
    has a label (class folders named like the result's classes, or a manifest ``label``
    column); only then are metrics computed. ``notes`` are lines for the user.
    """

    items: list[tuple[str, int]]
    labelled: bool
    notes: list[str] = field(default_factory=list)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _from_folder(root: Path, index: dict[str, int], notes: list[str]) -> list[tuple[str, int]]:
    files = sorted(p for p in root.rglob("*") if _is_image(p))
    rels = [f.relative_to(root) for f in files]
    # class folders anywhere (CLASS/x.png, test/CLASS/x.png): the folder holding the image
    parents = [r.parent.name if len(r.parts) > 1 else None for r in rels]
    known = [p in index for p in parents]
    if files and all(known):
        return [(str(f), index[p]) for f, p in zip(files, parents)]
    if any(known):
        odd = sorted({p or "." for p, k in zip(parents, known) if not k})
        notes.append(f"{root}: labels not used, folder(s) {', '.join(odd[:3])} are not classes "
                     f"of the result ({', '.join(index)})")
    return [(str(f), -1) for f in files]


def _from_manifest(path: Path, index: dict[str, int], notes: list[str]
                   ) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols:
            raise DataParameterError("data_path", path, f"a manifest needs a header with a path "
                                     f"column (and optionally label); found "
                                     f"{','.join(cols) or 'nothing'}.", shown=str(path))
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    labels = [r.get("label", "") for r in rows]
    use = "label" in cols and all(lab in index for lab in labels)
    if "label" in cols and not use:
        odd = sorted({lab for lab in labels if lab not in index})
        notes.append(f"{path}: labels not used, {', '.join(map(repr, odd[:3]))} are not classes "
                     f"of the result ({', '.join(index)})")
    return [(str(path.parent / r["path"]), index[lab] if use else -1)
            for r, lab in zip(rows, labels)]


def find_images(inputs: Sequence[str | Path], classes: Sequence[str]) -> NewImages:
    """The images under ``inputs``: folders (searched recursively, with or without class
    folders), ``.csv`` manifests (``path[,label]``, paths relative to the manifest), image
    files. Labels are the result's ``classes``; other names are ignored with a note.
    """
    index = {c: i for i, c in enumerate(classes)}
    items: list[tuple[str, int]] = []
    notes: list[str] = []
    if not inputs:
        raise DataError("no images given: pass --data FOLDER|MANIFEST.csv or image files.")
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            items += _from_folder(path, index, notes)
        elif path.is_file() and path.suffix.lower() == ".csv":
            items += _from_manifest(path, index, notes)
        elif path.is_file():
            # named explicitly, so tried even with an odd extension; a non-image is skipped
            items.append((str(path), -1))
        else:
            raise DataParameterError("data_path", path, "no such file or folder.",
                                     shown=str(path))
    if not items:
        raise DataError(f"no images found in {', '.join(map(str, inputs))} (extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}).")
    return NewImages(items, all(lab >= 0 for _, lab in items), notes)


# --- streaming predictions --------------------------------------------------------------------

@dataclass
class PredictRun:
    """What :func:`predict` did: the files it wrote, counts, metrics when labelled."""

    out: Path
    n_images: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped_csv: Path | None = None
    metrics: dict | None = None
    metrics_json: Path | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def predict_batches(predictor: Predictor, images: NewImages, *, batch_size: int = 32,
                    workers: int = 0, progress: bool = False
                    ) -> Iterator[tuple[list[tuple[str, int]], np.ndarray, np.ndarray,
                                        list[tuple[str, str]]]]:
    """Yield ``(items, pred, scores, skipped)`` one batch at a time, as images are read.

    ``items`` are the readable ``(path, label)`` of the batch, ``pred`` ``(b,)``, ``scores``
    ``(b, n_classes)``; ``skipped`` the ``(path, reason)`` of the batch's unreadable files.
    Nothing is kept between batches.
    """
    t = predictor.transform
    ds = ImageFiles(Path(""), images.items, t.eval_transform_uint8(), t.crop, dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                         num_workers=workers,
                                         pin_memory=predictor.device.type == "cuda")
    bar = tqdm(total=len(ds), unit="img", desc="predict", disable=not progress,
               dynamic_ncols=True)
    try:
        for batch, _, idx, errors in loader:
            ok = np.array([e == "" for e in errors])
            bad = [(images.items[i][0], e) for i, e in zip(idx.tolist(), errors) if e]
            items = [images.items[i] for i in idx[torch.from_numpy(ok)].tolist()]
            if ok.any():
                pred, scores = predictor.score_batch(batch[torch.from_numpy(ok)])
            else:
                pred = np.zeros(0, dtype=int)
                scores = np.zeros((0, len(predictor.classes)))
            bar.update(len(errors))
            yield items, pred, scores, bad
    finally:
        bar.close()


def _column_names(predictor: Predictor) -> list[str]:
    return [f"{predictor.outputs}_{c}" for c in predictor.classes]


def write_predictions(predictor: Predictor, batches, out: str | Path, *, labelled: bool
                      ) -> PredictRun:
    """Write ``batches`` (from :func:`predict_batches`) to the CSV ``out`` as they come.

    Columns: ``path``, ``predicted`` (class name), ``label`` (when ``labelled``), then
    ``prob_{class}`` or ``score_{class}`` per class. The rows go to a temporary file that
    replaces ``out`` only when every batch is written, so an earlier ``out`` survives a
    failed run. With labels, labels/predictions/scores are kept for the metrics.
    """
    out = Path(out)
    run = PredictRun(out)
    classes = predictor.classes
    ys, preds, scores_all = [], [], []
    t0 = time.perf_counter()
    with atomic_write(out) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "predicted"] + (["label"] if labelled else [])
                       + _column_names(predictor))
            for items, pred, scores, bad in batches:
                for (p, lab), k, s in zip(items, pred, scores):
                    w.writerow([p, classes[k]] + ([classes[lab]] if labelled else [])
                               + [f"{v:.8g}" for v in s])
                run.n_images += len(items)
                run.skipped += bad
                if labelled:
                    ys.append(np.array([lab for _, lab in items], dtype=int))
                    preds.append(pred)
                    scores_all.append(scores)
    run.seconds = time.perf_counter() - t0
    if labelled and run.n_images:
        y, p = np.concatenate(ys), np.concatenate(preds)
        run.metrics = classification_metrics(y, p, np.concatenate(scores_all), classes)
    return run


def predict(result_path: str | Path, inputs: Sequence[str | Path], out: str | Path, *,
            expect: str | None = None, weights: str | None = None, device: str = "auto",
            precision: str = "recorded", engine: str = "auto", batch_size: int = 32,
            workers: int = 0,
            progress: bool = True, log: Callable[[str], None] | None = None) -> PredictRun:
    """Apply the result at ``result_path`` to the images under ``inputs``; write ``out``.

    Besides the CSV: ``{stem}_skipped.csv`` (path, reason) when files could not be read,
    ``{stem}_metrics.json`` when every image has a label. See :func:`load_predictor` for the
    parameters it shares.
    """
    if batch_size < 1:
        raise ParameterError("batch_size", batch_size, "must be at least 1.")
    predictor = load_predictor(result_path, expect=expect, weights=weights, device=device,
                               precision=precision, engine=engine)
    images = find_images(inputs, predictor.classes)
    notes = predictor.notes + [f"note: {n}" for n in images.notes]
    for n in notes:
        if log is not None:
            log(n)
    run = write_predictions(
        predictor, predict_batches(predictor, images, batch_size=batch_size, workers=workers,
                                   progress=progress),
        out, labelled=images.labelled)
    run.notes = notes
    out = Path(out)
    skipped_csv = out.with_name(f"{out.stem}_skipped.csv")
    metrics_json = out.with_name(f"{out.stem}_metrics.json")
    # files from an earlier run must not pass for this one's
    skipped_csv.unlink(missing_ok=True)
    metrics_json.unlink(missing_ok=True)
    if run.skipped:
        with atomic_write(skipped_csv) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(run.skipped)
        run.skipped_csv = skipped_csv
    if run.metrics is not None:
        run.metrics_json = write_json(metrics_json, {
            "result": str(result_path), "model": predictor.model, "feature": predictor.feature,
            "classes": predictor.classes, "n_skipped": len(run.skipped), **run.metrics})
    return run
