"""Which exceptions are the user's to fix, and the one line they see for each.

The library raises :class:`FeatxError` (or a subclass) for what the user can fix, with a
complete message whose first line says what is wrong and what to do; the CLI asks
:func:`user_error_message` whether an exception is one to show as a line (not a traceback).
Any other exception is a bug in featx and keeps its traceback.
"""
from __future__ import annotations

import errno

__all__ = ["DiskFullError", "FeatxError", "is_disk_full", "is_read_only", "user_error_message"]


class FeatxError(ValueError):
    """Bad input or a setting the user can change: shown as one line, never a traceback.

    A ``ValueError`` so that callers of the library that catch ``ValueError`` keep working.
    """


class DiskFullError(OSError):
    """A write failed for lack of space; the message says what was kept and what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC, also as h5py reports it (a RuntimeError or OSError quoting ``errno = 28``)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return isinstance(exc, (OSError, RuntimeError)) and (
        "No space left on device" in text or "errno = 28," in text)


def is_read_only(exc: BaseException) -> bool:
    """A write refused by a read-only file system or missing permissions (h5py included)."""
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return True
    text = str(exc)
    return isinstance(exc, OSError) and ("Read-only file system" in text
                                         or "Permission denied" in text)


def _read_only_message(exc: OSError) -> str:
    import re
    name = exc.filename
    if name is None:  # h5py puts the name into the text: "... name = '/x/y.h5', errno = 30"
        m = re.search(r"name = '([^']*)'", str(exc))
        name = m.group(1) if m else None
    if name is not None:
        import os
        name = os.path.abspath(os.fsdecode(name))  # "cache" alone would not say where
    if exc.errno == errno.EROFS or "Read-only" in str(exc):
        return (f"cannot write {name or 'a file'}: read-only file system. Nothing was changed; "
                f"point --out (or the current folder, or TORCH_HOME for weights) at a writable "
                f"folder and run again.")
    # EACCES may also be a file that cannot be read, so this line does not say "write"
    return (f"permission denied: {name or 'a file'}. Nothing was changed; fix its permissions, "
            f"or point --out (or the current folder, or TORCH_HOME) at a folder you can use.")


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for ``exc``, or ``None`` for a bug that deserves a traceback."""
    if isinstance(exc, DiskFullError):
        return str(exc).splitlines()[0]
    if is_disk_full(exc):
        return ("the disk is full. Earlier results are untouched and finished work is kept; "
                "free some space and run the same command again to resume.")
    if is_read_only(exc):
        return _read_only_message(exc)
    if isinstance(exc, (FeatxError, FileNotFoundError, PermissionError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
