"""A dataset with its split fixed (:class:`DatasetSpec`), the split names, and the errors of
this package."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.config import MAX_SEED
from featx.errors import FeatxError, ParameterError

__all__ = ["IMAGE_EXTENSIONS", "MAX_SEED", "SPLITS", "DataError", "DataParameterError",
           "DatasetSpec"]

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")


class DataError(FeatxError):
    """The dataset cannot be used as given; the message says what to change."""


class DataParameterError(ParameterError, DataError):
    """A data setting (split fractions, seed, data path, image size) that cannot work."""


@dataclass
class DatasetSpec:
    """A dataset with its split fixed.

    Attributes
    ----------
    root : Path
        Folder the relative paths are resolved against.
    name : str
        Short name, used in cache file names.
    classes : list of str
        Class names; a label is an index into this list.
    splits : dict
        ``{"train": [(relpath, label), ...], "val": [...], "test": [...]}``; a split may be
        absent (no ``val/`` folder, a zero fraction).
    layout : str
        ``"folders-split"``, ``"folders"`` or ``"csv"``.
    seed, fractions
        How the split was made, for ``"folders"`` (and a CSV without a split column).
    notes : list of str
        What was done on the way that the user should hear (empty classes skipped, ...).
    """

    root: Path
    name: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    layout: str
    seed: int | None = None
    fractions: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over every split's (path, label, file size): changes when the files do.

        Sizes rather than contents keep this fast on large sets; mtimes are left out so that
        a copied dataset keeps its fingerprint.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.classes).encode())
        for split in SPLITS:
            for rel, label in self.splits.get(split, []):
                try:
                    size = (self.root / rel).stat().st_size
                except OSError:
                    size = -1
                h.update(f"{split}\0{rel}\0{label}\0{size}\n".encode())
        return h.hexdigest()

    def counts(self) -> dict[str, list[int]]:
        """Images per class for each split."""
        out = {}
        for split, items in self.splits.items():
            c = np.bincount([lab for _, lab in items], minlength=len(self.classes))
            out[split] = c.tolist()
        return out
