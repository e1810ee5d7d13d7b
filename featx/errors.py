"""Which exceptions are the user's to fix, and the one line they see for each.

The library raises :class:`FeatxError` (or a subclass) for what the user can fix, with a
complete message whose first line says what is wrong and what to do; the CLI asks
:func:`user_error_message` whether an exception is one to show as a line (not a traceback).
Any other exception is a bug in featx and keeps its traceback.

A message about one parameter's value is a :class:`ParameterError`: it names the library's
parameter (``batch_size=0: must be at least 1.``), and the CLI, which passes its map from
parameter names to flags, shows the flag instead (``--batch-size 0: must be at least 1.``).
"""
from __future__ import annotations

import errno
import re
from collections.abc import Mapping

__all__ = ["PARAMETERS", "DiskFullError", "FeatxError", "Note", "ParameterError",
           "is_disk_full", "is_read_only", "name_parameters", "user_error_message"]

# The library parameters (config fields and function arguments) that messages name; the CLI
# maps each to its flag (featx/cli.py, _FLAGS), and tests/test_params.py checks that each one
# still has a flag.
PARAMETERS = frozenset({
    "allow_missing", "backbone_lr_mult", "backend", "bootstrap", "batch_size", "class_weight", "cut", "cv",
    "data_path", "device", "draws", "early_stop", "engine", "epochs", "features", "finetune", "focal_gamma",
    "freeze", "heads", "image_size", "jobs", "layers", "loss", "lr", "map_store", "memory_limit_mb", "optimizer",
    "pca", "pool", "pools", "precision", "repeats", "resume", "scheduler", "seed", "select",
    "shots", "solver", "split_fractions", "split_seed", "store", "train_fraction", "weight_decay",
    "weights", "wide_pca", "workers",
})

# {name} of a parameter inside a message; other braces (in paths, in "pool{n}") stay as written
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def name_parameters(text: str, flags: Mapping[str, str] | None = None) -> str:
    """``text`` with each ``{name}`` of a parameter in :data:`PARAMETERS` written as ``name``
    (``flags`` None: the library's terms) or as ``flags[name]`` (the CLI's flag)."""
    def name(m: re.Match) -> str:
        if m.group(1) not in PARAMETERS:
            return m.group(0)
        return m.group(1) if flags is None else flags[m.group(1)]
    return _PLACEHOLDER.sub(name, text)


class FeatxError(ValueError):
    """Bad input or a setting the user can change: shown as one line, never a traceback.

    A ``ValueError`` so that callers of the library that catch ``ValueError`` keep working.
    The message may name parameters as ``{name}`` (see :func:`name_parameters`): ``str()``
    gives the library's names, :meth:`render` with the CLI's map its flags.
    """

    def render(self, flags: Mapping[str, str] | None = None) -> str:
        """The message naming parameters (``flags`` None) or the flags ``flags`` maps them to."""
        return name_parameters(super().__str__(), flags)

    def __str__(self) -> str:
        return self.render()


class ParameterError(FeatxError):
    """A parameter's value that cannot work: ``param=value: problem``.

    Parameters
    ----------
    param : str
        The library's name of the parameter (one of :data:`PARAMETERS`), e.g. ``"batch_size"``.
    value : object
        The value given, kept as ``.value``.
    problem : str
        What is wrong and what to do; may name other parameters as ``{name}``.
    shown : str, optional
        How the value is written: default ``repr`` for strings, ``str`` otherwise; ``""``
        names the parameter alone.
    sep : str, default ": "
        Between ``param=value`` and ``problem`` (``" "`` for "image_size=8 is too small").
    """

    def __init__(self, param: str, value: object = None, problem: str = "", *,
                 shown: str | None = None, sep: str = ": "):
        if param not in PARAMETERS:  # a bug in featx: the CLI could not name its flag
            raise ValueError(f"{param!r} is not in featx.errors.PARAMETERS")
        super().__init__(param, value, problem)  # args, so that the error pickles
        self.param, self.value, self.problem, self.sep = param, value, problem, sep
        self.shown = shown if shown is not None else (
            repr(value) if isinstance(value, str) else str(value))

    def render(self, flags: Mapping[str, str] | None = None) -> str:
        if flags is None:
            subject = f"{self.param}={self.shown}" if self.shown else self.param
        else:
            subject = f"{flags[self.param]} {self.shown}" if self.shown else flags[self.param]
        return subject + self.sep + name_parameters(self.problem, flags)


class Note(str):
    """A line for the user (not an error) that names parameters as ``{name}``: the string
    reads in the library's terms; :meth:`render` gives it with the CLI's flags."""

    template: str

    def __new__(cls, template: str) -> "Note":
        note = super().__new__(cls, name_parameters(template))
        note.template = template
        return note

    def render(self, flags: Mapping[str, str] | None = None) -> str:
        return name_parameters(self.template, flags)


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


def user_error_message(exc: BaseException, flags: Mapping[str, str] | None = None) -> str | None:
    """The one-line message for ``exc``, or ``None`` for a bug that deserves a traceback.

    ``flags`` maps parameter names to the flags that set them, for a :class:`FeatxError`
    (a :class:`ParameterError` above all) told in the CLI's terms; ``None`` keeps the
    library's names.
    """
    if isinstance(exc, DiskFullError):
        return str(exc).splitlines()[0]
    if is_disk_full(exc):
        return ("the disk is full. Earlier results are untouched and finished work is kept; "
                "free some space and run the same command again to resume.")
    if is_read_only(exc):
        return _read_only_message(exc)
    if isinstance(exc, FeatxError):
        text = exc.render(flags)
        return text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, (FileNotFoundError, PermissionError)):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
