"""The backbone registry: one entry per model, and the lookups. Nothing else checks names.

Each entry (:class:`BackboneSpec`) knows, for one model:

* how to build it (with the same constructor arguments its ImageNet weights need);
* ``features``: the last spatial map, i.e. the tensor the model itself pools globally
  (ResNet ``layer4``, VGG ``features``, DenseNet ``relu(features)``, ...);
* ``head``: from that map to the penultimate vector, i.e. exactly the input of the model's
  final classification ``Linear`` (in eval mode);
* where that final ``Linear`` lives, so fine-tuning can replace it;
* the ordered stages of its trunk, so fine-tuning can freeze "up to and including" one;
* ``layer_stages``: the stage outputs ``extract --layers stages`` reads (ResNet ``layer1``-
  ``layer4``, VGG's pooled blocks, ...), ``map_layer``: which of them *is* the last map, and
  ``penultimate_alias``: which feature of the last map equals ``penultimate`` (``pool1`` when
  the head is a global average pool), so that identical features are stored once.

Sources fill the registry: :mod:`featx.backbones.torchvision_models` registers one entry per
torchvision model; :mod:`featx.backbones.timm_models` registers the ``timm:`` prefix, whose
entries are made on demand. This module imports nothing of featx but its errors.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from featx.errors import FeatxError

__all__ = ["BF16_MAX_ERROR", "BackboneSpec", "UnknownModelError", "WeightsError",
           "bf16_keeps_features", "get_backbone", "is_timm", "list_backbones",
           "register_backbone", "register_source"]


# How far (relative, ‖bf16 - fp32‖ / ‖fp32‖ of the features) bf16 may move a model's
# features for ``--precision auto`` to choose it: ~3x what ResNets measure (3-5e-3, which
# changed no logistic head's accuracy by more than 1 pt, BENCHMARKS.md) and ~20x below
# ImageNet MobileNetV2's 0.2.
BF16_MAX_ERROR = 1e-2


class UnknownModelError(FeatxError):
    """A model name that is not in the registry."""


class WeightsError(FeatxError, RuntimeError):
    """Weights that cannot be found, loaded or matched to the model."""


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Attributes
    ----------
    name : str
        The featx/torchvision name, e.g. ``"resnet50"``.
    builder : callable
        torchvision's constructor, e.g. ``torchvision.models.resnet50``.
    weights_enum : type
        The torchvision weights enum; its ``DEFAULT`` is featx's ``imagenet``.
    penultimate_dim : int
        Length of the penultimate vector (input of the final ``Linear``).
    spatial_channels : int
        Channels ``C`` of the last spatial map; ``pool{n}`` has ``C*n*n`` values.
    classifier : str
        Dotted path of the final ``Linear`` inside the torchvision model.
    features : callable
        ``features(model, x) -> (B, C, H, W)`` last spatial map.
    head : callable
        ``head(model, fmap) -> (B, penultimate_dim)``, eval-mode pre-logits.
    stages : tuple of str
        Trunk stages in forward order (dotted module paths), for partial freezing.
    build_kwargs : dict
        Constructor arguments that make the architecture match the ImageNet weights.
    layer_stages : tuple of str
        Module names whose outputs ``--layers stages`` stores, in forward order
        (:mod:`featx.backbones.layers`).
    map_layer : str or None
        The module of ``layer_stages`` whose output is the last spatial map itself (its
        ``pool{n}`` are then the last map's); ``None`` when the map is computed after it
        (DenseNet applies ``norm5`` and a ReLU after its last dense block).
    penultimate_alias : str or None
        The last map's feature that equals ``penultimate`` exactly (``"pool1"`` for a head
        that is a global average pool, eval-mode Dropout at most), or ``None``.
    """

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type
    penultimate_dim: int
    spatial_channels: int
    classifier: str
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    stages: tuple[str, ...]
    build_kwargs: dict = field(default_factory=dict)
    # Keys present in torchvision's checkpoint that the built model does not use.
    ignore_keys: tuple[str, ...] = ()
    # bf16 vs fp32 relative error of its features, measured by benchmarks/bf16_error.py
    # (None: not measured), and with which weights ("imagenet" or "random": random init
    # can move less than trained weights, see BENCHMARKS.md)
    bf16_error: float | None = None
    bf16_measured_with: str = ""
    layer_stages: tuple[str, ...] = ()
    map_layer: str | None = None
    penultimate_alias: str | None = None

    @property
    def default_weights(self):
        return self.weights_enum.DEFAULT

    @property
    def default_image_size(self) -> int:
        return int(self.default_weights.transforms().crop_size[0])

    # channels-last pays on every torchvision model once its BatchNorms are folded
    channels_last = True

    def spatial(self, model: nn.Module, fmap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``features`` output -> ``(B, C, h, w)`` map; for torchvision models it already is."""
        return fmap

    def stage_parameter_names(self, model: nn.Module, stage: str) -> list[str]:
        """Parameter names of ``stage`` (``""``: the whole model), for freezing."""
        prefix = f"{stage}." if stage else ""
        return [prefix + n for n, _ in model.get_submodule(stage).named_parameters()]

    def drop_classifier(self, model: nn.Module) -> None:
        """Replace the final ``Linear`` by ``Identity`` (fine-tuning puts a new head on)."""
        parent, _, leaf = self.classifier.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Identity())


def bf16_keeps_features(spec) -> bool:
    """Whether ``spec``'s recorded bf16 error is within :data:`BF16_MAX_ERROR` (an entry
    without a measurement does not qualify): what ``--precision auto`` asks before bf16."""
    error = getattr(spec, "bf16_error", None)
    return error is not None and error <= BF16_MAX_ERROR


_REGISTRY: dict[str, BackboneSpec] = {}
# name prefix -> the function that makes that source's entry for a full name (``timm:``)
_SOURCES: dict[str, Callable[[str], BackboneSpec]] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add ``spec`` under ``spec.name``."""
    _REGISTRY[spec.name] = spec
    return spec


def register_source(prefix: str, make_spec: Callable[[str], BackboneSpec]) -> None:
    """Serve every name starting with ``prefix`` (e.g. ``"timm:"``) by ``make_spec(name)``."""
    _SOURCES[prefix] = make_spec


# --- lookups ----------------------------------------------------------------------------------

def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_REGISTRY)


def is_timm(name: str) -> bool:
    """Whether ``name`` is a ``timm:NAME`` model (served by :mod:`featx.backbones.timm_models`)."""
    return name.startswith("timm:")


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for ``name``; an unknown name suggests close ones.

    A name with a registered source's prefix (``timm:NAME``) gives that source's entry
    (:class:`~featx.backbones.timm_models.TimmSpec`, with the same attributes and methods).
    """
    for prefix, make_spec in _SOURCES.items():
        if name.startswith(prefix):
            return make_spec(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Run `featx models` to list the "
            f"{len(_REGISTRY)} available ones, or give any timm model as timm:NAME.") from None
