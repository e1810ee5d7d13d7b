"""The names of cached features: ``penultimate``, ``pool{n}`` and ``LAYER.KIND``.

One home for the naming rule, shared by the frozen model that computes the features, the
cache that stores them, and the heads, plots and exports that read them back:

* ``penultimate``: the input of the model's final classification ``Linear``;
* ``pool{n}``: ``AdaptiveAvgPool2d(n)`` of the last spatial map, flattened channel-major;
* ``LAYER.pool{n}``: the same of the output of the module ``LAYER`` (``layer3.pool2``);
* ``LAYER.cls``: a ViT block's class token (``blocks.7.cls``);
* ``last4``: DINOv2's linear-evaluation input, the last 4 blocks' class tokens and the last
  block's mean patch token, concatenated;
* ``LAYER.map`` / ``map``: a kept spatial map, ``(C, h, w)`` flattened (``--keep-map``), not
  a feature heads fit but what ``featx pool`` pools new sizes from.
"""
from __future__ import annotations

__all__ = ["CLS", "LAST4", "MAP", "PENULTIMATE", "feature_name", "layer_feature", "layer_of",
           "pool_of"]

PENULTIMATE = "penultimate"
CLS = "cls"
LAST4 = "last4"
MAP = "map"  # a kept spatial map (extract --keep-map): LAYER.map, or map for the last one


def feature_name(pool: int) -> str:
    """The cache's name for the ``pool`` x ``pool`` average-pooled last map: ``pool{n}``."""
    return f"pool{int(pool)}"


def layer_feature(layer: str, kind: str) -> str:
    """``("layer3", "pool2")`` -> ``"layer3.pool2"``; an empty layer is the last map."""
    return f"{layer}.{kind}" if layer else kind


def layer_of(feature: str) -> tuple[str, str]:
    """``"layer3.pool2"`` -> ``("layer3", "pool2")``; ``"pool2"`` -> ``("", "pool2")``."""
    layer, _, kind = feature.rpartition(".")
    return layer, kind


def pool_of(feature: str) -> int | None:
    """``n`` of a ``pool{n}`` feature name; ``None`` for ``penultimate`` or any other name
    (``layer3.pool2`` too: the pool sizes of the last map are what a pool-size plot shows)."""
    digits = feature[4:] if isinstance(feature, str) and feature.startswith("pool") else ""
    if digits.isascii() and digits.isdigit():
        return int(digits)
    return None
