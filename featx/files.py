"""Writing a file so that readers see the old one or the new one, never half of either."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_write"]


@contextlib.contextmanager
def atomic_write(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; move it onto ``path`` when the
    block ends without an error, remove it otherwise.

    The temporary file is in the same folder (``os.replace`` is atomic only within one file
    system) and hidden (``.NAME.PID.tmp``), so a crash, a full disk or a kill leaves the
    previous ``path`` intact. ``suffix`` ends the temporary name, for writers that choose
    the format by extension (``".png"``, ``".pt2"``). Missing folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
