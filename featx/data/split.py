"""The split: fractions and seeds checked, and the stratified, seeded cut per class."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featx.data.spec import MAX_SEED, SPLITS, DataError, DataParameterError

__all__ = ["check_seed", "parse_split_fractions", "split_per_class"]


def parse_split_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> ``(0.7, 0.15, 0.15)``; checks the values."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise DataParameterError("split_fractions", text, "must be three fractions train,val,"
                                 "test that sum to 1 with train > 0, e.g. 0.7,0.15,0.15", sep=" ")
    return parts  # type: ignore[return-value]


def check_seed(seed: int, param: str = "seed") -> int:
    """``seed`` if it is an integer in ``0..MAX_SEED``, else a :class:`DataError` (a
    :class:`~featx.errors.ParameterError`) naming ``param``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed <= MAX_SEED:
        raise DataParameterError(param, seed, f"must be an integer from 0 to {MAX_SEED}.",
                                 shown=str(seed))
    return int(seed)


def split_per_class(items_by_class: dict[int, list[str]], classes: list[str],
                     fractions: tuple[float, float, float], seed: int, root: Path
                     ) -> dict[str, list[tuple[str, int]]]:
    """Stratified, seeded split: each class is shuffled and cut by the fractions."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    need = 1 + sum(f > 0 for f in fractions[1:])
    for label, files in sorted(items_by_class.items()):
        n = len(files)
        n_val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
        n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
        if n - n_val - n_test < 1:
            raise DataError(
                f"{root}: class {classes[label]!r} has {n} image(s); a "
                f"{','.join(f'{f:g}' for f in fractions)} split needs at least {need} per class. "
                f"Add images, remove the class, or change {{split_fractions}}.")
        order = rng.permutation(n)
        picked = [files[i] for i in order]
        out["test"] += [(p, label) for p in picked[:n_test]]
        out["val"] += [(p, label) for p in picked[n_test:n_test + n_val]]
        out["train"] += [(p, label) for p in picked[n_test + n_val:]]
    for s in SPLITS:
        out[s].sort()
    return {s: v for s, v in out.items() if v}
