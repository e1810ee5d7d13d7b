"""`load_dataset`: any of the three layouts into a `DatasetSpec` with its split fixed.

Three layouts are accepted (see :func:`load_dataset`):

* a folder with ``train/`` (and optionally ``val/``, ``test/``), each holding class folders;
* a folder of class folders, which is split per class, stratified and seeded;
* a CSV manifest with columns ``path,label[,split]`` (paths relative to the CSV's folder).

The split is part of the data: :class:`DatasetSpec` holds the exact file list of every split,
and the same inputs always give the same lists.
"""
from __future__ import annotations

from pathlib import Path

from featx.data.folders import from_class_folders, from_split_folders
from featx.data.manifest import from_csv
from featx.data.spec import DataError, DataParameterError, DatasetSpec
from featx.data.split import check_seed

__all__ = ["load_dataset"]


def load_dataset(path: str | Path, *, split: tuple[float, float, float] = (0.7, 0.15, 0.15),
                 seed: int = 0) -> DatasetSpec:
    """Find the images and labels under ``path`` and fix the split.

    Parameters
    ----------
    path : str or Path
        A folder (pre-split or class folders) or a ``.csv`` manifest.
    split : tuple of 3 floats, default (0.7, 0.15, 0.15)
        Train/val/test fractions, used only when the data does not carry its own split.
    seed : int, default 0
        Seed of that split.
    """
    path = Path(path)
    seed = check_seed(seed)
    if not path.exists():
        raise DataParameterError("data_path", path, "no such file or folder.", shown=str(path))
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataParameterError("data_path", path, "expected a folder or a .csv manifest.",
                                     shown=str(path))
        spec = from_csv(path, split, seed)
    elif (path / "train").is_dir():
        spec = from_split_folders(path)
    else:
        spec = from_class_folders(path, split, seed)
    _check_train(spec)
    return spec


def _check_train(spec: DatasetSpec) -> None:
    train = spec.splits.get("train", [])
    if not train:
        raise DataError(f"{spec.root}: the train split is empty.")
    present = {lab for _, lab in train}
    if len(present) < 2:
        raise DataError(f"{spec.root}: the train split holds a single class "
                        f"({spec.classes[next(iter(present))]}); a classifier needs at least two.")
