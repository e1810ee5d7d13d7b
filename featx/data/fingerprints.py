"""Fingerprints of file lists: two results share a test set exactly when these are equal."""
from __future__ import annotations

import hashlib
from typing import Any, Iterable, Sequence

__all__ = ["dataset_fingerprints", "file_list_fingerprint"]


def file_list_fingerprint(items: Iterable[tuple[str, int]]) -> str:
    """sha256 of a list of ``(relpath, label)``: two results share a test set iff equal."""
    h = hashlib.sha256()
    for rel, label in items:
        h.update(f"{rel}\0{int(label)}\n".encode())
    return h.hexdigest()


def dataset_fingerprints(splits: dict[str, Sequence[tuple[str, int]]]) -> dict[str, Any]:
    """``split_fingerprint``, ``files_fingerprint`` (all files, whatever their split),
    ``test_fingerprint`` and ``counts`` of the files a run scores.

    ``splits`` is ``{split: [(relpath, label), ...]}`` with the readable files only. The same
    lists give the same fingerprints whether they come from a cache or from ``--data``, so
    ``report`` can tell that a head and a fine-tuned model saw the very same images.
    """
    order = [s for s in ("train", "val", "test") if s in splits]
    order += [s for s in splits if s not in order]
    all_items = [(f"{s}/{p}", lab) for s in order for p, lab in splits[s]]
    return {
        "split_fingerprint": file_list_fingerprint(all_items),
        # the same files however they are split: what repeats over splits have in common
        "files_fingerprint": file_list_fingerprint(sorted(it for s in order for it in splits[s])),
        "test_fingerprint": file_list_fingerprint(splits.get("test", [])),
        "counts": {s: len(splits[s]) for s in order},
    }
