"""One torch module per result: frozen backbone + the pooling of its feature + the head.

:func:`head_module` turns a fitted sklearn pipeline into torch layers that give the same
numbers: the affine steps (``StandardScaler``, the PCA of ``--pca`` runs) and a linear head
(ridge, logistic, linear SVM, SGD) fold exactly into one ``nn.Linear``
(``W' = W/σ``, ``b' = b - W·μ/σ``, in float64, then float32); an MLP becomes its ``Linear``
layers and activations, the scaler folded into the first. k-NN and kernel SVMs have no such
form and are refused. :func:`export_result` puts that head behind the backbone and saves
the whole with ``torch.export`` (a ``.pt2`` that ``torch.export.load`` reads without featx).

The exported module takes what the cache was computed from: a ``(N, 3, H, W)`` **uint8** RGB
batch, already resized and center-cropped as recorded (``H = W`` = the crop); it normalises
inside, in float32. It returns ``(N, n_classes)`` scores with sklearn's meaning: the
probabilities of ``predict_proba`` for heads that have it (logistic, MLP, SGD log-loss) and
for fine-tuned networks (softmax), else ``decision_function`` (ridge, linear SVM; a binary
decision ``s`` becomes the two columns ``[-s, s]``). ``argmax`` over classes is sklearn's
``predict``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featx.errors import FeatxError
from featx.features import pool_of
from featx.files import atomic_write

__all__ = ["ExportedClassifier", "HeadLayers", "UnsupportedHeadError", "export_result",
           "head_module", "read_export_info"]

EXTRA_FILE = "featx.json"  # metadata stored inside the .pt2 (torch.export extra_files)


class UnsupportedHeadError(FeatxError):
    """A head with no exact torch form (k-NN, kernel SVM, ...)."""


# --- sklearn -> torch -------------------------------------------------------------------------

def _affine_of(step, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A, c)`` with ``step.transform(x) == x @ A + c``, in float64."""
    from sklearn.decomposition import PCA, IncrementalPCA
    from sklearn.preprocessing import StandardScaler
    if step is None or step == "passthrough":
        return np.eye(width), np.zeros(width)
    if isinstance(step, StandardScaler):
        mean = step.mean_ if step.with_mean else np.zeros(width)
        scale = step.scale_ if step.with_std else np.ones(width)
        return np.diag(1.0 / scale), -mean / scale
    if isinstance(step, (PCA, IncrementalPCA)):
        comp = step.components_.astype(np.float64)  # (k, d)
        if step.whiten:
            comp = comp / np.sqrt(step.explained_variance_)[:, None]
        return comp.T, -(step.mean_ @ comp.T)
    raise UnsupportedHeadError(f"pipeline step {type(step).__name__} has no exact torch form; "
                               f"export folds StandardScaler and PCA only.")


class HeadLayers(nn.Module):
    """Torch form of a fitted head: ``layers`` on features, then ``output``.

    ``output``: ``"none"`` (decision scores), ``"softmax"``, or ``"ovr"`` (sigmoid per class,
    normalised to sum 1: sklearn's one-vs-rest probabilities). Input ``(N, D)`` raw cached
    features; output ``(N, n_classes)``.
    """

    def __init__(self, layers: nn.Sequential, output: str):
        super().__init__()
        if output not in ("none", "softmax", "ovr"):
            raise ValueError(f"output {output!r}: use none, softmax or ovr.")
        self.layers = layers
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layers(x)
        if self.output == "softmax":
            return z.softmax(1)
        if self.output == "ovr":
            p = torch.sigmoid(z)
            return p / p.sum(1, keepdim=True)
        return z


def _linear(W: np.ndarray, b: np.ndarray) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(W.astype(np.float32)))
        lin.bias.copy_(torch.from_numpy(np.asarray(b, dtype=np.float32)))
    return lin


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "logistic": nn.Sigmoid,
                "identity": nn.Identity}


def head_module(pipeline, n_classes: int | None = None) -> HeadLayers:
    """The torch form of a fitted featx head pipeline (``Pipeline`` or a bare estimator).

    Exact for ``RidgeClassifier``, ``LogisticRegression``, ``LinearSVC``,
    ``SGDClassifier`` (any linear loss) and ``MLPClassifier`` behind any chain of
    ``StandardScaler`` / ``PCA`` / ``IncrementalPCA``. Raises :class:`UnsupportedHeadError`
    for other estimators and for a head that never saw some of the ``n_classes`` classes.
    """
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    steps = [s for _, s in pipeline.steps] if isinstance(pipeline, Pipeline) else [pipeline]
    *pre, est = steps
    seen = np.asarray(getattr(est, "classes_", []))
    if n_classes is not None and (len(seen) != n_classes
                                  or not np.array_equal(seen, np.arange(n_classes))):
        raise UnsupportedHeadError(
            f"the head was fitted on classes {seen.tolist()} of {n_classes}; export needs "
            f"every class in training. Use featx predict instead.")
    width = int(getattr(pipeline, "n_features_in_", 0) or getattr(est, "n_features_in_"))
    A, c = np.eye(width), np.zeros(width)  # x -> x @ A + c, the folded affine steps
    for step in pre:
        A2, c2 = _affine_of(step, A.shape[1])
        A, c = A @ A2, c @ A2 + c2
    proba = hasattr(est, "predict_proba")
    if isinstance(est, MLPClassifier):
        layers: list[nn.Module] = []
        coefs, intercepts = est.coefs_, est.intercepts_
        for i, (W, b) in enumerate(zip(coefs, intercepts)):
            W, b = np.asarray(W, np.float64).T, np.asarray(b, np.float64)  # (out, in)
            if i == 0:
                W, b = W @ A.T, W @ c + b
            last = i == len(coefs) - 1
            if last and est.out_activation_ == "logistic":  # binary: one logit z
                W, b = np.vstack([-W, W]) / 2, np.r_[-b, b] / 2  # softmax = [1-σ(z), σ(z)]
            layers.append(_linear(W, b))
            if not last:
                layers.append(_ACTIVATIONS[est.activation]())
        return HeadLayers(nn.Sequential(*layers), "softmax")
    if not hasattr(est, "coef_") or not hasattr(est, "decision_function") \
            or type(est).__name__ in ("SVC", "NuSVC"):
        raise UnsupportedHeadError(
            f"a {type(est).__name__} head has no exact torch form; export supports the "
            f"linear, logistic, svm, sgd and mlp heads. Use featx predict for this one.")
    W = np.atleast_2d(np.asarray(est.coef_, np.float64))
    b = np.atleast_1d(np.asarray(est.intercept_, np.float64)) * np.ones(W.shape[0])
    W, b = W @ A.T, W @ c + b
    if W.shape[0] == 1:  # binary: decision s for classes_[1]
        if proba:
            # logistic / SGD log-loss: predict_proba is [1-σ(s), σ(s)] = softmax([-s/2, s/2])
            return HeadLayers(nn.Sequential(_linear(np.vstack([-W, W]) / 2,
                                                    np.r_[-b, b] / 2)), "softmax")
        return HeadLayers(nn.Sequential(_linear(np.vstack([-W, W]), np.r_[-b, b])), "none")
    if proba:
        from sklearn.linear_model import LogisticRegression
        output = "softmax" if isinstance(est, LogisticRegression) else "ovr"
        return HeadLayers(nn.Sequential(_linear(W, b)), output)
    return HeadLayers(nn.Sequential(_linear(W, b)), "none")


# --- the whole network ------------------------------------------------------------------------

class ExportedClassifier(nn.Module):
    """uint8 images ``(N, 3, H, W)``, resized and cropped -> ``(N, n_classes)`` scores.

    ``network`` gets the normalised float images. With ``pool`` > 0 or ``penultimate`` it is
    a :class:`~featx.backbones.FeatureModel` and the feature is ``AdaptiveAvgPool2d(pool)`` of
    its spatial map (flattened channel-major) or its penultimate vector, as in the cache;
    otherwise (a fine-tuned network) its output is the feature. ``head`` maps it to scores.
    """

    def __init__(self, network: nn.Module, head: nn.Module, mean, std, *, pool: int = 0,
                 penultimate: bool = False):
        super().__init__()
        self.network = network
        self.head = head
        self.pool = pool
        self.penultimate = penultimate
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255 - self.mean) / self.std
        if self.pool or self.penultimate:
            # FeatureModel's own forward: the map it returns is what the cache pooled (for a
            # ViT the patch tokens on their grid); torch.export drops the unused output
            fmap, pen = self.network(x)
            z = F.adaptive_avg_pool2d(fmap, self.pool).flatten(1) if self.pool else pen
        else:
            z = self.network(x)
        return self.head(z)


def _module_for(predictor) -> tuple[ExportedClassifier, str]:
    t = predictor.transform
    if predictor.kind == "finetune":
        return (ExportedClassifier(predictor.network, nn.Softmax(1), t.mean, t.std), "prob")
    from featx.apply.predictor import feature_request
    if feature_request(predictor.feature)[0]:
        # the exported program reads the last map or the penultimate, not a hooked layer
        raise UnsupportedHeadError(
            f"{predictor.result_path.name} is a head on the intermediate layer feature "
            f"{predictor.feature!r}: featx predict applies it, export takes heads on "
            f"penultimate or pool{{n}} (or a finetune --cut run) only.")
    head = head_module(predictor.pipeline, len(predictor.classes))
    pool = pool_of(predictor.feature)
    return (ExportedClassifier(predictor.network, head, t.mean, t.std,
                               pool=pool or 0, penultimate=pool is None),
            "prob" if head.output != "none" else "score")


def export_result(result_path: str | Path, out: str | Path | None = None, *,
                  weights: str | None = None) -> tuple[Path, dict]:
    """Export the result at ``result_path`` as one ``torch.export`` program; returns
    ``(path, info)``.

    ``out`` defaults to the result's path with ``.pt2``. The file is written under a
    temporary name, loaded back and run on a random batch (its output must equal the eager
    module's), and only then moved into place. ``info`` (also stored in the file as
    ``featx.json``, see :func:`read_export_info`) says what goes in and what comes out.
    """
    from featx.apply.predictor import load_predictor
    predictor = load_predictor(result_path, weights=weights, device="cpu", precision="fp32")
    module, outputs = _module_for(predictor)
    # channels-last weights (featx's fast CPU form) are saved by torch.export as partial
    # storages with a warning; the contiguous form saves cleanly and loads anywhere
    module = module.to(memory_format=torch.contiguous_format).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    t = predictor.transform
    out = Path(out) if out is not None else Path(result_path).with_suffix(".pt2")
    info = {
        "format": "featx-export/1",
        "result": str(result_path),
        "kind": predictor.kind,
        "model": predictor.model,
        "feature": predictor.feature,
        "head": predictor.result.get("head"),
        "classes": predictor.classes,
        "input": {"dtype": "uint8", "shape": ["N", 3, t.crop, t.crop], "channels": "RGB",
                  "preprocess": f"resize the short side to {t.resize} ({t.interpolation}, "
                                f"antialias), center-crop {t.crop}, no normalisation",
                  "transform": t.to_dict()},
        "output": {"shape": ["N", len(predictor.classes)],
                   "meaning": {"prob": "class probabilities (sklearn predict_proba / softmax)",
                               "score": "decision scores (sklearn decision_function)"}[outputs],
                   "argmax": "the predicted class index into classes"},
        "weights_sha256": (predictor.result.get("provenance") or {}).get("weights_sha256"),
        "precision": "fp32",
    }
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, t.crop, t.crop), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        program = torch.export.export(module, (example,),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        expected = module(example)
    with atomic_write(out, suffix=".pt2") as tmp:  # torch wants the suffix
        torch.export.save(program, tmp, extra_files={EXTRA_FILE: json.dumps(info)})
        loaded = torch.export.load(tmp).module()
        with torch.no_grad():
            got = loaded(example)
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"the exported program's output differs from the module's "
                               f"(max {float((got - expected).abs().max()):.3g}); not written.")
    return out, info


def read_export_info(path: str | Path) -> dict:
    """The ``featx.json`` metadata of an exported ``.pt2`` (classes, input, output)."""
    extra = {EXTRA_FILE: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[EXTRA_FILE])
