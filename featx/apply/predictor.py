"""What runs on new images: a result's backbone + head, or its fine-tuned network.

:func:`load_predictor` rebuilds either one from a result JSON (:mod:`featx.predict` applies it
to new images) and refuses, with one line, when what it would run is not what produced the
result (other weights, another model, a checkpoint of another run).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

# extract's own model and batch forward: new images get the very features the cache holds
# (same BatchNorm folding, memory format, precision handling)
from featx.artifacts import artifact_file, load_head_model
from featx.backbones import (
    FrozenModel,
    ResolvedWeights,
    RunSetup,
    WeightsError,
    backbone_transform,
    bf16_keeps_features,
    build_backbone,
    feature_dims,
    frozen_model,
    get_backbone,
    layer_plan,
    resolve_engine,
    resolve_weights,
)
from featx.data.images import TransformSpec
from featx.errors import FeatxError
from featx.features import CLS, LAST4, PENULTIMATE, feature_name, layer_of, pool_of
from featx.results import read_result
from featx.runtime import autocast, resolve_device, resolve_precision

__all__ = ["Predictor", "ResultMismatchError", "feature_request", "feature_width",
           "load_predictor"]


class ResultMismatchError(FeatxError):
    """What would run now is not what produced the result (weights, model, checkpoint)."""



# --- what runs: a backbone + head, or a fine-tuned network --------------------------------------

def feature_request(feature: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The ``layers`` and ``pools`` a frozen model needs to compute cached ``feature``:
    ``penultimate`` -> ``((), ())``, ``pool2`` -> ``((), (2,))``, ``layer3.pool2`` ->
    ``(("layer3",), (2,))``, ``blocks.7.cls`` -> ``(("blocks.7",), ())``, ``last4`` ->
    ``(("last4",), ())``."""
    if feature == PENULTIMATE:
        return (), ()
    if feature == LAST4:
        return (LAST4,), ()
    layer, kind = layer_of(feature)
    pool = pool_of(kind)
    if kind != CLS and pool is None:
        raise FeatxError(f"feature {feature!r}: expected penultimate, pool{{n}}, "
                         f"LAYER.pool{{n}}, LAYER.cls or last4.")
    return ((layer,) if layer else ()), ((pool,) if pool is not None else ())


def feature_width(name: str, feature: str, image_size: int | None = None) -> int:
    """Width of cached feature ``feature`` for model ``name`` (at ``image_size`` pixels,
    default the model's: an intermediate layer's map size depends on it)."""
    layers, pools = feature_request(feature)
    if not layers:
        dims = feature_dims(name, pools)
        return dims[PENULTIMATE if not pools else feature_name(pools[0])]
    return layer_plan(name, layers, pools, image_size).dims[feature]


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
        layers, pools = feature_request(self.feature)
        # an intermediate layer's feature comes with the plan it was built for (None: its
        # own pools); the last map's one pool size is asked for as such
        X = self.frozen.features(images, None if layers else pools)[self.feature]
        pred = np.asarray(self.pipeline.predict(X), dtype=int)
        scores = class_scores(self.pipeline, X, len(self.classes))
        if scores.ndim == 1:  # a binary decision: positive means classes[1]
            scores = np.column_stack([-scores, scores])
        return pred, scores


def _recorded_precision(recorded: str | None, requested: str, device: torch.device,
                        notes: list[str], model: str | None) -> str:
    if requested != "recorded":
        # a head's backbone gives frozen features: the registry's bf16 rule applies (model);
        # a fine-tuned network (None) runs as it was trained, in mixed precision
        return resolve_precision(requested, device, bf16_ok=model is None
                                 or bf16_keeps_features(get_backbone(model)))
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
                    precision: str, engine: str) -> Predictor:
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
    cache = (result.get("artifacts") or {}).get("cache", "the cache")
    model_path = artifact_file(path, result, missing=f"re-run fit-heads on {cache} to write it")
    pipeline = load_head_model(model_path)
    layers, pools = feature_request(feature)
    width = feature_width(model, feature, prov.get("image_size"))
    if getattr(pipeline, "n_features_in_", width) != width:
        raise ResultMismatchError(f"{model_path.name} takes {pipeline.n_features_in_} features, "
                                  f"but {model} {feature} has {width}; it belongs to another "
                                  f"model. Re-run fit-heads.")
    w = _weights_for(model, prov, weights)
    transform = backbone_transform(model, w, prov.get("image_size"))
    if prov.get("transform") and transform.to_dict() != prov["transform"]:
        raise ResultMismatchError(f"{path}: featx now builds the transform {transform.to_dict()} "
                                  f"for {model}, the cache recorded {prov['transform']}.")
    notes: list[str] = []
    prec = _recorded_precision(prov.get("precision"), precision, device, notes, model)
    # the engine need not be the recorded one: engines agree with torch fp32 within 1e-5
    # intermediate layers run in torch (an exported graph gives the last map only): auto
    # picks it, and an engine named explicitly is refused by frozen_model in one line
    eng = "torch" if layers and engine == "auto" else resolve_engine(engine, device, prec)
    ready = RunSetup(device, prec, w, transform, eng)
    frozen = frozen_model(model, ready, layers=layers, pools=pools or (1,), notes=notes)
    outputs = "prob" if hasattr(pipeline, "predict_proba") else "score"
    return Predictor("head", path, result, model, feature, list(result["dataset"]["classes"]),
                     transform, frozen.network, device, prec, outputs, pipeline, w.source,
                     notes, frozen)


def _finetune_predictor(path: Path, result: dict, *, device: torch.device,
                        precision: str) -> Predictor:
    from featx.finetune import FinetuneModel
    settings = result.get("settings") or {}
    ckpt_path = artifact_file(path, result, missing="re-run the featx finetune command that "
                                                    "wrote this result")
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
                            pool=int(cfg.get("pool", 1)), cut=cfg.get("cut"))
    try:
        network.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise ResultMismatchError(f"{ckpt_path} does not fit {result['model']}: "
                                  f"{str(exc).splitlines()[0]}") from None
    notes: list[str] = []
    prec = _recorded_precision(settings.get("precision_used"), precision, device, notes,
                               None)
    return Predictor("finetune", path, result, result["model"], result.get("feature") or "",
                     classes, transform, network.eval().to(device), device, prec, "prob",
                     weights_source=f"{ckpt_path} (epoch {ckpt.get('epoch')})", notes=notes)


def load_predictor(result_path: str | Path, *, expect: str | None = None,
                   weights: str | None = None, device: str = "auto",
                   precision: str = "recorded", engine: str = "auto") -> Predictor:
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
    engine : what runs a head result's backbone (featx/backbones/engines.py): ``auto``,
        ``torch``, ``onnxruntime``, ``openvino``; a fine-tuned network runs in torch.
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
        return _head_predictor(path, result, weights=weights, device=dev, precision=precision,
                               engine=engine)
    if kind == "finetune":
        return _finetune_predictor(path, result, device=dev, precision=precision)
    raise FeatxError(f"{path}: result kind {kind!r} cannot be applied to images.")
