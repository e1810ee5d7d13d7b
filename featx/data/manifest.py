"""The CSV manifest layout: ``path,label[,split]``, paths relative to the CSV's folder."""
from __future__ import annotations

import csv
import posixpath
from pathlib import Path

from featx.data.spec import SPLITS, DataError, DatasetSpec
from featx.data.split import split_per_class

__all__ = ["from_csv", "read_manifest"]


def read_manifest(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
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


def from_csv(path: Path, fractions, seed) -> DatasetSpec:
    root = path.parent
    cols, numbered = read_manifest(path)
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
    splits = split_per_class(by_class, classes, fractions, seed, root)
    return DatasetSpec(root, path.stem, classes, splits, "csv", seed, tuple(fractions))
