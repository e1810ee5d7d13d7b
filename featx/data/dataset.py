"""Finding images and labels, the split, and the fingerprints of the file lists.

Three layouts are accepted (see :func:`load_dataset`):

* a folder with ``train/`` (and optionally ``val/``, ``test/``), each holding class folders;
* a folder of class folders, which is split per class, stratified and seeded;
* a CSV manifest with columns ``path,label[,split]`` (paths relative to the CSV's folder).

The split is part of the data: :class:`DatasetSpec` holds the exact file list of every split,
and the same inputs always give the same lists.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from featx.config import MAX_SEED
from featx.errors import FeatxError, ParameterError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DataError",
    "DataParameterError",
    "MAX_SEED",
    "DatasetSpec",
    "check_seed",
    "dataset_fingerprints",
    "file_list_fingerprint",
    "load_dataset",
    "parse_split_fractions",
]

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


def file_list_fingerprint(items: Iterable[tuple[str, int]]) -> str:
    """sha256 of a list of ``(relpath, label)``: two results share a test set iff equal."""
    h = hashlib.sha256()
    for rel, label in items:
        h.update(f"{rel}\0{int(label)}\n".encode())
    return h.hexdigest()


def dataset_fingerprints(splits: dict[str, Sequence[tuple[str, int]]]) -> dict[str, Any]:
    """``split_fingerprint``, ``test_fingerprint`` and ``counts`` of the files a run scores.

    ``splits`` is ``{split: [(relpath, label), ...]}`` with the readable files only. The same
    lists give the same fingerprints whether they come from a cache or from ``--data``, so
    ``report`` can tell that a head and a fine-tuned model saw the very same images.
    """
    order = [s for s in ("train", "val", "test") if s in splits]
    order += [s for s in splits if s not in order]
    all_items = [(f"{s}/{p}", lab) for s in order for p, lab in splits[s]]
    return {
        "split_fingerprint": file_list_fingerprint(all_items),
        "test_fingerprint": file_list_fingerprint(splits.get("test", [])),
        "counts": {s: len(splits[s]) for s in order},
    }


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


class _Skips:
    """Files a folder scan leaves out, turned into notes for the user."""

    def __init__(self):
        self.not_regular: list[str] = []
        self.bad_names: list[str] = []

    def notes(self) -> list[str]:
        out = []
        for files, why in ((self.not_regular, "are not regular files (FIFO, socket, device, "
                            "broken link) and were skipped"),
                           (self.bad_names, "have names that are not valid UTF-8 and were "
                            "skipped; rename them")):
            files = list(dict.fromkeys(files))  # a bad class folder name shows in each split
            if files:
                shown = ", ".join(files[:5]) + (f", ... ({len(files)} in all)"
                                                if len(files) > 5 else "")
                out.append(f"{len(files)} file(s) {why}: {shown}")
        return out


def _printable(name: str) -> str:
    """A file name as text even when it is not valid UTF-8 (bad bytes as ``\\xff``)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # undecodable bytes arrive as lone surrogates
        return True
    except UnicodeEncodeError:
        return False


def _class_dirs(folder: Path, skips: _Skips | None = None) -> list[Path]:
    dirs = []
    for d in sorted(folder.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        if not _utf8(d.name):
            if skips is not None:
                skips.bad_names.append(_printable(d.name) + "/")
            continue
        dirs.append(d)
    return dirs


def _images_in(folder: Path, root: Path, skips: _Skips) -> list[Path]:
    """Image files under ``folder``; FIFOs, sockets, devices and names that are not UTF-8
    go to ``skips`` instead (opening a FIFO would block the run forever)."""
    found = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() not in IMAGE_EXTENSIONS or p.name.startswith("."):
            continue
        rel = p.relative_to(root).as_posix()
        try:
            mode = p.stat().st_mode
        except OSError:
            mode = None  # a broken link
        if mode is not None and stat.S_ISDIR(mode):
            continue
        if mode is None or not stat.S_ISREG(mode):
            skips.not_regular.append(_printable(rel))
        elif not _utf8(rel):
            skips.bad_names.append(_printable(rel))
        else:
            found.append(p)
    return found


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
        spec = _from_csv(path, split, seed)
    elif (path / "train").is_dir():
        spec = _from_split_folders(path)
    else:
        spec = _from_class_folders(path, split, seed)
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


def _from_split_folders(root: Path) -> DatasetSpec:
    notes, skips = [], _Skips()
    class_names = sorted({d.name for s in SPLITS if (root / s).is_dir()
                          for d in _class_dirs(root / s, skips)})
    index = {c: i for i, c in enumerate(class_names)}
    splits: dict[str, list[tuple[str, int]]] = {}
    for s in SPLITS:
        if not (root / s).is_dir():
            continue
        items = []
        for d in _class_dirs(root / s):
            files = _images_in(d, root, skips)
            if not files:
                notes.append(f"{s}/{d.name} holds no images")
            items += [(f.relative_to(root).as_posix(), index[d.name]) for f in files]
        splits[s] = items
    empty = [c for c in class_names if not any(lab == index[c] for _, lab in splits["train"])]
    if empty:
        raise DataError(f"{root}: class(es) {', '.join(empty)} have no images in train/; add "
                        f"some or remove those folders.")
    return DatasetSpec(root, root.name, class_names, splits, "folders-split",
                       notes=notes + skips.notes())


def _split_per_class(items_by_class: dict[int, list[str]], classes: list[str],
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


def _from_class_folders(root: Path, fractions, seed) -> DatasetSpec:
    notes, skips = [], _Skips()
    dirs = _class_dirs(root, skips)
    if not dirs:
        raise DataError(f"{root}: no class folders found. Expected {root}/CLASS/*.png, "
                        f"{root}/train/CLASS/*.png, or a CSV manifest.")
    found = {}
    for d in dirs:
        files = [f.relative_to(root).as_posix() for f in _images_in(d, root, skips)]
        if files:
            found[d.name] = files
        else:
            notes.append(f"class folder {d.name}/ holds no images and was left out")
    classes = sorted(found)
    by_class = {i: found[c] for i, c in enumerate(classes)}
    splits = _split_per_class(by_class, classes, fractions, seed, root)
    return DatasetSpec(root, root.name, classes, splits, "folders", seed, tuple(fractions),
                       notes + skips.notes())


def _read_manifest(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header's column names and ``(line number, row)`` for each data row.

    Refuses, naming the line, a row with fewer or more fields than the header, an empty
    path or label, and a file listed twice (the same path after normalising ``./``, ``..``
    and doubled slashes), whether in one split or in two: such a file would be counted twice
    or leak from one split into another.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            reader = csv.reader(f)
            header = next(reader, [])
            cols = [c.strip().lower() for c in header]
            if "path" not in cols or "label" not in cols:
                raise DataError(f"{path}: a manifest needs a header with columns "
                                f"path,label[,split]; found {','.join(cols) or 'nothing'}.")
            rows, first_line = [], {}
            for fields in reader:
                line = reader.line_num
                if not any(v.strip() for v in fields):
                    continue  # blank line
                if len(fields) != len(cols):
                    raise DataError(
                        f"{path}, line {line}: {len(fields)} field(s) where the header has "
                        f"{len(cols)} ({','.join(cols)}); quote a path that holds a comma.")
                row = {c: v.strip() for c, v in zip(cols, fields)}
                for key in ("path", "label"):
                    if not row[key]:
                        raise DataError(f"{path}, line {line}: the {key} is empty; every row "
                                        f"needs a path and a label.")
                key = posixpath.normpath(row["path"].replace("\\", "/"))
                if key in first_line:
                    before, earlier = first_line[key]
                    where = (f"in two splits ({earlier.get('split') or 'unsplit'} at line "
                             f"{before}, {row.get('split') or 'unsplit'} here)"
                             if earlier.get("split", "") != row.get("split", "")
                             else f"twice (first at line {before})")
                    raise DataError(f"{path}, line {line}: {row['path']} is listed {where}; "
                                    f"list each file once.")
                first_line[key] = (line, row)
                rows.append((line, row))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the manifest as "
                        f"UTF-8.") from None
    return cols, rows


def _from_csv(path: Path, fractions, seed) -> DatasetSpec:
    root = path.parent
    cols, numbered = _read_manifest(path)
    if not numbered:
        raise DataError(f"{path}: the manifest lists no images.")
    rows = [r for _, r in numbered]
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    has_split = "split" in cols and any(r.get("split") for r in rows)
    if has_split:
        for line, r in numbered:
            if r["split"] not in SPLITS:
                raise DataError(f"{path}, line {line}: unknown split value {r['split']!r}; "
                                f"use train, val or test.")
        splits = {s: sorted((r["path"], index[r["label"]]) for r in rows if r["split"] == s)
                  for s in SPLITS}
        splits = {s: v for s, v in splits.items() if v}
        return DatasetSpec(root, path.stem, classes, splits, "csv")
    by_class = {i: sorted(r["path"] for r in rows if r["label"] == c) for i, c in enumerate(classes)}
    splits = _split_per_class(by_class, classes, fractions, seed, root)
    return DatasetSpec(root, path.stem, classes, splits, "csv", seed, tuple(fractions))
