"""Labelled subsets of the train split, for label-efficiency curves: k images per class
(``shots``) or a stratified fraction, seeded, with val and test untouched.

A draw depends only on the train files (their paths and labels, in any order), the seed and
the draw number, so ``fit-heads`` (rows of a cache) and ``finetune`` (the same cache's files,
or the same data split again) train on the very same images. Within one (seed, draw) every
class is shuffled once and the first images taken, so subsets are nested: the 2-shot set
holds the 1-shot set, a fraction of 0.5 holds that of 0.1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from featx.data.fingerprints import file_list_fingerprint
from featx.errors import ParameterError

__all__ = ["TrainSubset", "draw_train_subset", "parse_fractions", "parse_shots",
           "subset_record", "train_subsets"]

# a constant first word of the seed sequence: a subset's stream never equals another use of
# the same (seed, draw) pair (head init, shuffling)
_STREAM = 0x5AB5E7


@dataclass(frozen=True)
class TrainSubset:
    """One labelled subset: ``shots`` images per class, or a ``fraction`` of each class,
    draw ``draw`` (0, 1, ...)."""

    shots: int | None = None
    fraction: float | None = None
    draw: int = 0

    @property
    def tag(self) -> str:
        """``shots4-d0`` / ``frac0.1-d2``: the subset in file and folder names."""
        what = f"shots{self.shots}" if self.shots is not None else f"frac{self.fraction:g}"
        return f"{what}-d{self.draw}"

    def to_dict(self) -> dict:
        return {"shots": self.shots, "fraction": self.fraction, "draw": self.draw}


def parse_shots(values: Sequence) -> tuple[int, ...]:
    """``("1", "2", 4)`` -> ``(1, 2, 4)``; each at least 1."""
    out = []
    for v in values:
        try:
            k = int(str(v).strip())
        except ValueError:
            k = None
        if k is None or k < 1 or str(v).strip() != str(k):
            raise ParameterError("shots", ",".join(map(str, values)), "must be whole numbers "
                                 "of labelled images per class, at least 1, e.g. 1,2,4,8,16.",
                                 shown=",".join(map(str, values)))
        out.append(k)
    return tuple(dict.fromkeys(out))


def parse_fractions(values: Sequence) -> tuple[float, ...]:
    """``("0.01", "1")`` -> ``(0.01, 1.0)``; each more than 0 and at most 1."""
    out = []
    for v in values:
        try:
            f = float(str(v).strip())
        except ValueError:
            f = math.nan
        if not 0 < f <= 1:
            raise ParameterError("train_fraction", ",".join(map(str, values)),
                                 "must be fractions of the train split, more than 0 and at "
                                 "most 1, e.g. 0.01,0.1,0.5,1.",
                                 shown=",".join(map(str, values)))
        out.append(f)
    return tuple(dict.fromkeys(out))


def train_subsets(shots: Sequence = (), fractions: Sequence = (), draws: int = 3
                  ) -> list[TrainSubset]:
    """Every (subset, draw) asked for: each shot count and fraction, ``draws`` draws each.

    A fraction of 1 is the whole train split, the same for every draw, so it is drawn once.
    """
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ParameterError("draws", draws, "must be at least 1.")
    out = [TrainSubset(shots=k, draw=r) for k in parse_shots(shots) for r in range(draws)]
    for f in parse_fractions(fractions):
        out += [TrainSubset(fraction=f, draw=r) for r in range(1 if f == 1 else draws)]
    return out


def draw_train_subset(items: Sequence[tuple[str, int]], classes: Sequence[str],
                      subset: TrainSubset, seed: int) -> np.ndarray:
    """Positions into ``items`` (the train split's ``(relpath, label)``) of ``subset``.

    Returns
    -------
    ndarray of int64, increasing: exactly ``subset.shots`` images of every class present
    in train, or ``max(1, round(fraction * n_c))`` of each class of ``n_c`` images.

    Raises
    ------
    ParameterError
        ``shots`` larger than a class has: one line naming the class and its count (the
        curve's x axis would otherwise lie about that class).
    """
    labels = np.array([lab for _, lab in items], dtype=np.int64)
    by_path = sorted(range(len(items)), key=lambda i: items[i][0])  # independent of row order
    rng = np.random.default_rng([_STREAM, int(seed), int(subset.draw)])
    chosen = []
    for c in range(len(classes)):
        members = np.array([i for i in by_path if labels[i] == c], dtype=np.int64)
        order = members[rng.permutation(len(members))]  # every class, every time: nested
        n_c = len(members)
        if n_c == 0:
            continue
        if subset.shots is not None:
            if subset.shots > n_c:
                raise ParameterError(
                    "shots", subset.shots, f"class {classes[c]!r} has only {n_c} train "
                    f"image(s); use shot counts up to {n_c}, or {{train_fraction}} for "
                    f"larger subsets.")
            k = subset.shots
        else:
            k = max(1, round(subset.fraction * n_c))
        chosen.append(order[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def subset_record(items: Sequence[tuple[str, int]], idx: np.ndarray, classes: Sequence[str],
                  subset: TrainSubset, seed: int) -> dict:
    """What a result records about the subset it was trained on."""
    picked = sorted(items[i] for i in idx)
    counts = np.bincount([lab for _, lab in picked], minlength=len(classes))
    return {**subset.to_dict(), "seed": int(seed), "n_train": len(picked),
            "n_train_full": len(items), "per_class": counts.tolist(),
            "train_fingerprint": file_list_fingerprint(picked)}
