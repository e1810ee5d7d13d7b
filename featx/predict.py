"""Applying a finished result to new images, with the backbone and transform it recorded.

A head result (``fit-heads``) links everything needed: its ``provenance`` is the cache's (model,
weights and their sha256, transform, precision), and its fitted pipeline sits beside it
(``artifacts.model``, a ``.joblib``). A fine-tuning result names its best checkpoint
(``best.pt``), which holds the whole network. :func:`load_predictor` rebuilds either one and
refuses, with one line, when what it would run is not what produced the result (other
weights, another model, a checkpoint of another run). :func:`predict` then streams new images
through it batch by batch and writes ``predictions.csv`` atomically.
"""
from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from featx.backbones import (ResolvedWeights, WeightsError, backbone_transform, build_backbone,
                             get_backbone, resolve_weights)
from featx.cache import PENULTIMATE, feature_name, pool_of
from featx.data import IMAGE_EXTENSIONS, DataError, DataParameterError
from featx.errors import FeatxError, ParameterError
from featx.files import atomic_write
from featx.images import ImageFiles, TransformSpec
# extract's own model and batch forward: new images get the very features the cache holds
# (same BatchNorm folding, memory format, precision handling)
from featx.extract import FrozenModel, feature_dims, frozen_model
from featx.metrics import classification_metrics
from featx.results import read_result, write_json
from featx.runtime import RunSetup, autocast, resolve_device, resolve_precision

__all__ = [
    "NewImages",
    "PredictRun",
    "Predictor",
    "ResultMismatchError",
    "feature_width",
    "find_images",
    "load_predictor",
    "predict",
    "predict_batches",
    "write_predictions",
]


class ResultMismatchError(FeatxError):
    """What would run now is not what produced the result (weights, model, checkpoint)."""


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


# --- what runs: a backbone + head, or a fine-tuned network --------------------------------------

def feature_width(name: str, feature: str) -> int:
    """Width of cached feature ``feature`` (``penultimate`` or ``pool{n}``) for model ``name``."""
    if feature == PENULTIMATE:
        return feature_dims(name, ())[PENULTIMATE]
    pool = pool_of(feature)
    if pool is None:
        raise FeatxError(f"feature {feature!r}: expected penultimate or pool{{n}}.")
    return feature_dims(name, (pool,))[feature_name(pool)]


@dataclass
class Predictor:
    """A rebuilt result, ready to score batches of images.

    ``kind`` is ``"head"`` or ``"finetune"``; ``network`` is the frozen :class:`FeatureModel`
    (heads) or the fine-tuned network (in eval mode, on ``device``); ``pipeline`` the fitted
    sklearn pipeline and ``frozen`` the backbone's forward (heads only); ``transform`` the
    recorded eval transform; ``outputs`` ``"prob"`` (probabilities: predict_proba, softmax) or
    ``"score"`` (decision_function).
    """

    kind: str
    result_path: Path
    result: dict
    model: str
    feature: str
    classes: list[str]
    transform: TransformSpec
    network: torch.nn.Module
    device: torch.device
    precision: str
    outputs: str
    pipeline: object = None
    weights_source: str = ""
    notes: list[str] = field(default_factory=list)
    frozen: FrozenModel | None = None

    def score_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Predicted labels ``(B,)`` and scores ``(B, n_classes)`` for ``(B, 3, H, W)`` uint8
        images already resized and cropped (``transform.eval_transform_uint8``)."""
        if self.kind == "finetune":
            x = images.to(self.device, non_blocking=True)
            with torch.inference_mode(), autocast(self.device, self.precision):
                logits = self.network(self.transform.normalize_batch(x))
            prob = logits.float().softmax(1).cpu().numpy()
            return prob.argmax(1), prob
        from featx.heads import class_scores
        pool = pool_of(self.feature)
        pools = (pool,) if pool is not None else ()
        X = self.frozen.features(images, pools)[self.feature]
        pred = np.asarray(self.pipeline.predict(X), dtype=int)
        scores = class_scores(self.pipeline, X, len(self.classes))
        if scores.ndim == 1:  # a binary decision: positive means classes[1]
            scores = np.column_stack([-scores, scores])
        return pred, scores


def _recorded_precision(recorded: str | None, requested: str, device: torch.device,
                        notes: list[str]) -> str:
    if requested != "recorded":
        return resolve_precision(requested, device)
    recorded = recorded or "fp32"
    if recorded == "fp16" and device.type == "cpu":
        notes.append("note: the result was computed in fp16, which needs a GPU; using fp32.")
        return "fp32"
    return recorded


def _seed_of(sha: str) -> int:
    m = re.fullmatch(r"none-seed(-?\d+)", sha or "")
    return int(m.group(1)) if m else 0


def _recorded_weights_file(prov: dict) -> str | None:
    if prov.get("weights_path"):
        return prov["weights_path"]
    # caches written before weights_path was recorded: the path ends the source text
    m = re.fullmatch(r"(?:.*state dict |\S+ \S+ from )(.+)", prov.get("weights_source", ""))
    return m.group(1) if m else None


def _weights_for(model: str, prov: dict, override: str | None) -> ResolvedWeights:
    """The weights that produced the cache, found again, with the same sha256 - or an error."""
    want = prov.get("weights_sha256", "")
    kind = prov.get("weights_kind")
    recorded = _recorded_weights_file(prov)
    if override is not None:
        w = resolve_weights(model, override, seed=_seed_of(want))
    elif kind == "none":
        w = resolve_weights(model, "none", seed=_seed_of(want))
    elif kind == "imagenet":
        w = resolve_weights(model, "imagenet")
        if w.sha256 != want and recorded and Path(recorded).is_file():
            # another ImageNet release became the default since: take the recorded one
            f = resolve_weights(model, recorded)
            w = replace(f, kind="imagenet", source=prov.get("weights_source", f.source),
                        version=prov.get("weights_version") or w.version)
    else:
        if not recorded or not Path(recorded).is_file():
            raise WeightsError(
                f"the weights file that produced this result ({recorded or 'not recorded'}) is "
                f"not there; pass --weights FILE with that file (sha256 {want[:12]}...).")
        w = resolve_weights(model, recorded)
    if w.sha256 != want:
        where = w.path or w.source
        raise ResultMismatchError(
            f"the weights differ from those that produced this result: {where} has sha256 "
            f"{w.sha256[:12]}..., the result was made with {want[:12]}... "
            f"({prov.get('weights_source', '?')}). Restore that file or pass --weights FILE "
            f"with it; a new backbone needs a new extract and fit-heads.")
    return w


def _head_predictor(path: Path, result: dict, *, weights: str | None, device: torch.device,
                    precision: str) -> Predictor:
    import joblib
    prov = result.get("provenance") or {}
    model, feature = prov.get("model"), result.get("feature")
    if not model or result.get("model") != model:
        raise ResultMismatchError(f"{path}: the result names model {result.get('model')!r} but "
                                  f"its provenance {model!r}; re-run fit-heads on the cache.")
    spec = get_backbone(model)
    for key, have in (("penultimate_dim", spec.penultimate_dim),
                      ("spatial_channels", spec.spatial_channels)):
        if prov.get(key) is not None and int(prov[key]) != have:
            raise ResultMismatchError(f"{path}: {model} had {key} {prov[key]} when the cache was "
                                      f"made, this featx builds {have}; extract again.")
    name = (result.get("artifacts") or {}).get("model")
    joblib_path = path.with_name(name) if name else None
    if joblib_path is None or not joblib_path.is_file():
        cache = (result.get("artifacts") or {}).get("cache", "the cache")
        raise FileNotFoundError(
            f"{path}: the fitted head ({joblib_path.name if joblib_path else 'no .joblib'}) is "
            f"missing; re-run fit-heads on {cache} to write it.")
    pipeline = joblib.load(joblib_path)
    width = feature_width(model, feature)
    if getattr(pipeline, "n_features_in_", width) != width:
        raise ResultMismatchError(f"{joblib_path.name} takes {pipeline.n_features_in_} features, "
                                  f"but {model} {feature} has {width}; it belongs to another "
                                  f"model. Re-run fit-heads.")
    w = _weights_for(model, prov, weights)
    transform = backbone_transform(model, w, prov.get("image_size"))
    if prov.get("transform") and transform.to_dict() != prov["transform"]:
        raise ResultMismatchError(f"{path}: featx now builds the transform {transform.to_dict()} "
                                  f"for {model}, the cache recorded {prov['transform']}.")
    notes: list[str] = []
    prec = _recorded_precision(prov.get("precision"), precision, device, notes)
    frozen = frozen_model(model, RunSetup(device, prec, w, transform))
    outputs = "prob" if hasattr(pipeline, "predict_proba") else "score"
    return Predictor("head", path, result, model, feature, list(result["dataset"]["classes"]),
                     transform, frozen.network, device, prec, outputs, pipeline, w.source,
                     notes, frozen)


def _finetune_predictor(path: Path, result: dict, *, device: torch.device,
                        precision: str) -> Predictor:
    from featx.finetune import FinetuneModel
    settings = result.get("settings") or {}
    name = (result.get("artifacts") or {}).get("model", "best.pt")
    ckpt_path = path.with_name(name)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"{path}: the checkpoint {ckpt_path.name} is missing; re-run the "
                                f"featx finetune command that wrote this result.")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read {ckpt_path}: {exc}".splitlines()[0]) from None
    classes = list(result["dataset"]["classes"])
    cfg = ckpt.get("config") or {}
    best_epoch = (result.get("selection") or {}).get("best_epoch")
    checks = [
        (cfg.get("model") == result.get("model"),
         f"holds model {cfg.get('model')!r}, the result {result.get('model')!r}"),
        (list(ckpt.get("classes") or []) == classes,
         f"holds classes {ckpt.get('classes')}, the result {classes}"),
        (ckpt.get("split_fingerprint") == result["dataset"].get("split_fingerprint"),
         "was trained on another split"),
        (best_epoch is None or ckpt.get("epoch") == best_epoch,
         f"is from epoch {ckpt.get('epoch')}, the result scored epoch {best_epoch}"),
    ]
    for ok, what in checks:
        if not ok:
            raise ResultMismatchError(f"{ckpt_path} {what}: it is not the checkpoint this result "
                                      f"scored. Re-run the featx finetune command.")
    if not settings.get("transform"):
        raise FeatxError(f"{path}: the result does not record its transform; re-run finetune.")
    transform = TransformSpec(**settings["transform"])
    # the architecture only: every weight comes from the checkpoint
    backbone = build_backbone(result["model"], "none", image_size=transform.crop)
    network = FinetuneModel(get_backbone(result["model"]), backbone, len(classes),
                            pool=int(cfg.get("pool", 1)))
    try:
        network.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ResultMismatchError(f"{ckpt_path} does not fit {result['model']}: "
                                  f"{str(exc).splitlines()[0]}") from None
    notes: list[str] = []
    prec = _recorded_precision(settings.get("precision_used"), precision, device, notes)
    return Predictor("finetune", path, result, result["model"], result.get("feature") or "",
                     classes, transform, network.eval().to(device), device, prec, "prob",
                     weights_source=f"{ckpt_path} (epoch {ckpt.get('epoch')})", notes=notes)


def load_predictor(result_path: str | Path, *, expect: str | None = None,
                   weights: str | None = None, device: str = "auto",
                   precision: str = "recorded") -> Predictor:
    """Rebuild what produced the result at ``result_path``.

    Parameters
    ----------
    result_path : path of a result JSON (``fit-heads`` or ``finetune``).
    expect : ``"head"``, ``"finetune"`` or None (either).
    weights : where the backbone weights are now (``imagenet``, ``none``, a file) when they
        moved; default: as recorded. Their sha256 must equal the recorded one (heads only).
    device : ``auto``, ``cpu``, ``cuda``.
    precision : ``recorded`` (what the result was computed with; fp16 becomes fp32 on a CPU)
        or ``auto``, ``fp32``, ``bf16``, ``fp16``.
    """
    path = Path(result_path)
    result = read_result(path)
    kind = result.get("kind")
    if expect is not None and kind != expect:
        other = {"head": "--head", "finetune": "--finetuned"}.get(kind, "another command")
        raise FeatxError(f"{path} is a {kind} result, not a {expect} result; pass it with "
                         f"{other}.")
    dev = resolve_device(device)
    if kind == "head":
        return _head_predictor(path, result, weights=weights, device=dev, precision=precision)
    if kind == "finetune":
        return _finetune_predictor(path, result, device=dev, precision=precision)
    raise FeatxError(f"{path}: result kind {kind!r} cannot be applied to images.")


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
            precision: str = "recorded", batch_size: int = 32, workers: int = 0,
            progress: bool = True, log: Callable[[str], None] | None = None) -> PredictRun:
    """Apply the result at ``result_path`` to the images under ``inputs``; write ``out``.

    Besides the CSV: ``{stem}_skipped.csv`` (path, reason) when files could not be read,
    ``{stem}_metrics.json`` when every image has a label. See :func:`load_predictor` for the
    parameters it shares.
    """
    if batch_size < 1:
        raise ParameterError("batch_size", batch_size, "must be at least 1.")
    predictor = load_predictor(result_path, expect=expect, weights=weights, device=device,
                               precision=precision)
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
