"""The two folder layouts: ``train/``, ``val/``, ``test/`` of class folders, or class folders
that featx splits. FIFOs, sockets, devices and names that are not UTF-8 are left out, said."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from featx.data.spec import IMAGE_EXTENSIONS, SPLITS, DataError, DatasetSpec
from featx.data.split import split_per_class

__all__ = ["from_class_folders", "from_split_folders"]


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


def from_split_folders(root: Path) -> DatasetSpec:
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


def from_class_folders(root: Path, fractions, seed) -> DatasetSpec:
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
    splits = split_per_class(by_class, classes, fractions, seed, root)
    return DatasetSpec(root, root.name, classes, splits, "folders", seed, tuple(fractions),
                       notes + skips.notes())
