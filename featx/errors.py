"""Which exceptions are the user's to fix, and the one line they see for each.

The library raises ordinary exceptions with complete messages; the CLI asks
:func:`user_error_message` whether an exception is one to show as a line (not a traceback).
"""
from __future__ import annotations

import errno

__all__ = ["user_error_message"]


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for ``exc``, or ``None`` for a bug that deserves a traceback."""
    from featx.backbones import UnknownModelError, WeightsError
    from featx.cache import CacheError
    from featx.data import DataError

    if isinstance(exc, OSError) and (exc.errno == errno.ENOSPC or "No space left" in str(exc)):
        return ("the disk is full. Earlier results are untouched and finished work is kept; "
                "free some space and run the same command again to resume.")
    if isinstance(exc, (UnknownModelError, WeightsError, CacheError, DataError, ValueError,
                        FileNotFoundError, PermissionError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
