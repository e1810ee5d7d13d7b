"""The names of cached features: ``penultimate`` and ``pool{n}``.

One home for the naming rule, shared by the frozen model that computes the features, the
cache that stores them, and the heads, plots and exports that read them back.
"""
from __future__ import annotations

__all__ = ["PENULTIMATE", "feature_name", "pool_of"]

PENULTIMATE = "penultimate"


def feature_name(pool: int) -> str:
    """The cache's name for the ``pool`` x ``pool`` average-pooled last map: ``pool{n}``."""
    return f"pool{int(pool)}"


def pool_of(feature: str) -> int | None:
    """``n`` of a ``pool{n}`` feature name; ``None`` for ``penultimate`` or any other name."""
    digits = feature[4:] if isinstance(feature, str) and feature.startswith("pool") else ""
    if digits.isascii() and digits.isdigit():
        return int(digits)
    return None
