"""Writing a featx cache (the layout: :mod:`featx.cache`): streaming appends with resume,
free-space checks, and the lock that lets one run at a time write a file.

A file is written under ``NAME.h5.partial`` and renamed to ``NAME.h5`` only once complete;
a ``.partial`` file is resumed by the next run with the same inputs.
One run at a time writes a cache: :func:`lock_cache` holds ``NAME.h5.lock`` (``flock``, so a
killed run's lock goes with its process). A write that fails for lack of space removes the
``.partial`` (HDF5 cannot be trusted after a failed flush) and raises
:class:`~featx.errors.DiskFullError`; a ``.partial`` that cannot be reopened is started afresh.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

import h5py
import numpy as np

from featx.cache.layout import (
    SCHEMA_VERSION,
    CacheError,
    diff_provenance,
    encode_attr,
    partial_path,
    read_attrs,
)
from featx.errors import DiskFullError, is_disk_full

__all__ = ["CacheLockedError", "CacheWriter", "free_bytes", "lock_cache", "lock_path"]

_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: large enough for fast writes, small for streaming
# Room kept free beyond a batch's rows: new chunks, HDF5 metadata and the closing flush.
_SPACE_MARGIN = 4 << 20


def free_bytes(folder: Path) -> int:
    """Bytes a write into ``folder`` may still use (``statvfs``; cheap, so asked per batch)."""
    import shutil
    return shutil.disk_usage(folder).free


class CacheLockedError(CacheError):
    """Another run is writing the same cache file."""


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


# Test hook: a path; the run that just took a cache's lock waits (at most 10 minutes) until a
# file appears there, so a test can start a second run while the first surely holds the lock.
_HOLD_ENV = "FEATX_TEST_HOLD_LOCK_UNTIL"


def _hold_for_test() -> None:
    release = os.environ.get(_HOLD_ENV)
    deadline = time.monotonic() + 600
    while release and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)


@contextlib.contextmanager
def lock_cache(path: str | Path):
    """Hold ``NAME.h5.lock`` while one run checks and writes ``NAME.h5``.

    ``flock`` is released by the kernel when the holder dies, so a killed run never leaves a
    stale lock. A second run refuses at once with :class:`CacheLockedError` naming the
    holder's pid and host (written into the lock file). The lock file is removed on release;
    a run that locked a file another run just removed tries again on the new one.
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another run"
            os.close(fd)
            raise CacheLockedError(
                f"{path} is being written by another featx run ({holder}); wait for it to "
                f"finish, or write elsewhere with --out.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed this file while we waited on it
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%H:%M:%S')}".encode(), 0)
        _hold_for_test()
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


class CacheWriter:
    """Streams feature rows into a ``.partial`` file, resuming one with the same inputs.

    Parameters
    ----------
    path : Path
        Final file name; writes go to ``path.partial`` until :meth:`finish`.
    provenance : dict
        Root attributes; must include :data:`~featx.cache.PROVENANCE_KEYS`.
    splits : dict
        ``{split: [(relpath, label), ...]}``, the full file lists.
    dims : dict
        ``{feature_name: width}``, e.g. ``{"penultimate": 512, "pool2": 2048}``.
    store_dtype : str, default "float32"
        ``"float32"`` or ``"float16"``.
    dtypes : dict, optional
        ``{feature_name: dtype}`` for features stored otherwise (kept maps: fp16 by default).
    """

    def __init__(self, path: Path, provenance: dict, splits: dict, dims: dict,
                 store_dtype: str = "float32", dtypes: dict | None = None):
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        self.splits = splits
        self.dims = dims
        self.store_dtype = np.dtype(store_dtype)
        self.dtypes = {name: np.dtype(dtypes.get(name, store_dtype) if dtypes else store_dtype)
                       for name in dims}
        self.resumed = False
        self.notes: list[str] = []
        self.f = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.tmp.exists() and self._can_resume(provenance):
            try:
                self.f = h5py.File(self.tmp, "r+", rdcc_nbytes=0)
                self._truncate_to_committed()
                self._check_committed_rows()
                self.resumed = True
            except Exception as exc:  # e.g. "addr overflow" after a disk filled up mid-flush
                self._discard()
                if is_disk_full(exc):
                    raise self._disk_full() from None
                self.notes.append(f"note: the unfinished {self.tmp.name} could not be reopened "
                                  f"({_first_line(exc)}); starting it afresh.")
        if self.f is None:
            self.tmp.unlink(missing_ok=True)
            with self._space_guard():
                # no raw-data chunk cache: a chunk that cannot be written then fails in the
                # write call, where it can be handled, instead of in a later flush or garbage
                # collection, after which HDF5 crashes (segfault) on a full disk
                self.f = h5py.File(self.tmp, "w", rdcc_nbytes=0)
                self._create(provenance)

    def _check_committed_rows(self) -> None:
        """Read the last committed row of every dataset: a file whose data did not reach the
        disk fails here, at open, rather than on the first write."""
        for split in self.splits:
            g = self.f[split]
            n = int(g.attrs["n_rows"])
            for name in list(self.dims) + ["labels", "paths"]:
                if g[name].shape[0] != n:
                    raise CacheError(f"{split}/{name} has {g[name].shape[0]} rows, "
                                     f"committed {n}")
                # a probe row, written and dropped: after a disk filled up mid-flush HDF5 can
                # read such a file but fails on the next allocation ("addr overflow")
                ds = g[name]
                ds.resize(n + 1, axis=0)
                ds[n] = "" if ds.dtype.kind == "O" else np.zeros(ds.shape[1:], ds.dtype)
                self.f.flush()
                ds.resize(n, axis=0)
        self.f.flush()

    # -- a full disk --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _space_guard(self):
        """Turn a write that failed for lack of space (h5py says so in a RuntimeError or an
        OSError) into :class:`DiskFullError`, after removing the ``.partial``."""
        try:
            yield
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            self._discard()
            raise self._disk_full() from None

    def _discard(self) -> None:
        """Close and remove the ``.partial``. After a failed flush HDF5 segfaults when it
        later closes the file on a still-full disk; emptying the file first frees the space
        its last flush needs, so it closes cleanly."""
        with contextlib.suppress(OSError):
            os.truncate(self.tmp, 0)
        if self.f is not None:
            with contextlib.suppress(Exception):
                self.f.close()
            self.f = None
        self.tmp.unlink(missing_ok=True)

    def _disk_full(self) -> DiskFullError:
        return DiskFullError(
            errno.ENOSPC, f"the disk is full: writing {self.tmp} failed ({_free_mb(self.tmp)}). "
            f"The unfinished file was removed and earlier caches are untouched; free some "
            f"space and run the same command again (it starts this model afresh).")

    # -- creation and resume ---------------------------------------------------------------
    def _can_resume(self, provenance: dict) -> bool:
        try:
            with h5py.File(self.tmp, "r") as f:
                attrs = read_attrs(f)
                if attrs.get("featx_schema") != SCHEMA_VERSION:
                    return False
                same = not diff_provenance(attrs, provenance)
                return same and all(s in f for s in self.splits)
        except Exception as exc:  # an unreadable partial is only lost work, never a result
            self.notes.append(f"note: the unfinished {self.tmp.name} cannot be read "
                              f"({_first_line(exc)}); starting it afresh.")
            return False

    def _create(self, provenance: dict) -> None:
        f = self.f
        for k, v in provenance.items():
            f.attrs[k] = encode_attr(v)
        f.attrs["featx_schema"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        for split, items in self.splits.items():
            g = f.create_group(split)
            g.attrs["next_index"] = 0
            g.attrs["n_rows"] = 0
            g.attrs["n_items"] = len(items)
            for name, width in self.dims.items():
                dtype = self.dtypes[name]
                rows = max(1, min(1024, _CHUNK_BYTES // (width * dtype.itemsize)))
                g.create_dataset(name, shape=(0, width), maxshape=(None, width),
                                 dtype=dtype, chunks=(rows, width))
            g.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64,
                             chunks=(4096,))
            g.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(4096,))
            full = f.create_group(f"split/{split}")
            full.create_dataset("paths", data=np.array([p for p, _ in items], dtype=object),
                                dtype=_STR)
            full.create_dataset("labels", data=np.array([lab for _, lab in items], np.int64))
        s = f.create_group("skipped")
        s.attrs["n"] = 0
        for name in ("split", "path", "reason"):
            s.create_dataset(name, shape=(0,), maxshape=(None,), dtype=_STR, chunks=(256,))
        f.flush()

    def _truncate_to_committed(self) -> None:
        """Drop rows written after the last commit (a run killed mid-batch)."""
        for split in self.splits:
            g = self.f[split]
            n = int(g.attrs["n_rows"])
            for name in list(self.dims) + ["labels", "paths"]:
                g[name].resize(n, axis=0)
        s = self.f["skipped"]
        for name in ("split", "path", "reason"):
            s[name].resize(int(s.attrs["n"]), axis=0)

    def next_index(self, split: str) -> int:
        """How many of ``split``'s files are already done (written or skipped)."""
        return int(self.f[split].attrs["next_index"])

    # -- streaming ---------------------------------------------------------------------------
    def append(self, split: str, next_index: int, features: dict[str, np.ndarray],
               labels: np.ndarray, paths: list[str], skipped: list[tuple[str, str]]) -> None:
        """Write one batch of rows, then commit ``next_index`` (files consumed so far).

        Refuses with :class:`DiskFullError` before writing when the disk has not room for
        the batch (and the file's closing flush): the ``.partial`` then holds every batch
        before it, and the next run resumes from there.
        """
        need = sum(int(a.size) * self.dtypes[k].itemsize for k, a in features.items()) \
            + 512 * (len(labels) + len(skipped)) + _SPACE_MARGIN
        free = free_bytes(self.tmp.parent)
        if free < need:
            raise DiskFullError(
                errno.ENOSPC, f"the disk is full: {free / 2**20:.1f} MB free in "
                f"{self.tmp.parent}, the next batch needs about {need / 2**20:.1f} MB. The "
                f"finished part is kept in {self.tmp.name} and earlier caches are untouched; "
                f"free some space and run the same command again to resume.")
        with self._space_guard():
            self._append(split, next_index, features, labels, paths, skipped)

    def _append(self, split, next_index, features, labels, paths, skipped) -> None:
        g = self.f[split]
        n0 = int(g.attrs["n_rows"])
        n1 = n0 + len(labels)
        if n1 > n0:
            for name, arr in features.items():
                ds = g[name]
                ds.resize(n1, axis=0)
                ds[n0:n1] = arr.astype(ds.dtype, copy=False)
            g["labels"].resize(n1, axis=0)
            g["labels"][n0:n1] = labels
            g["paths"].resize(n1, axis=0)
            g["paths"][n0:n1] = np.array(paths, dtype=object)
        if skipped:
            s = self.f["skipped"]
            k0 = int(s.attrs["n"])
            k1 = k0 + len(skipped)
            for name, values in (("split", [split] * len(skipped)),
                                 ("path", [p for p, _ in skipped]),
                                 ("reason", [r for _, r in skipped])):
                s[name].resize(k1, axis=0)
                s[name][k0:k1] = np.array(values, dtype=object)
            s.attrs["n"] = k1
        # the commit: only after the data is in place do the counters move
        g.attrs["n_rows"] = n1
        g.attrs["next_index"] = next_index
        self.f.flush()

    def finish(self, extra_attrs: dict) -> Path:
        """Record ``extra_attrs`` (timings), mark complete and move into place atomically.

        Refuses (and leaves the ``.partial``) when a split has files not yet consumed: only
        a complete file may carry the final name.
        """
        for split, items in self.splits.items():
            done = self.next_index(split)
            if done != len(items):
                raise CacheError(f"{self.tmp}: {split} has {done} of {len(items)} files done; "
                                 f"not marking it complete.")
        with self._space_guard():
            for k, v in extra_attrs.items():
                self.f.attrs[k] = encode_attr(v)
            self.f.attrs["complete"] = True
            self.f.close()
        self.f = None
        os.replace(self.tmp, self.path)
        return self.path

    def close(self) -> None:
        """Close without finishing: the ``.partial`` file stays for the next run to resume."""
        if self.f is None:
            return
        try:
            self.f.close()
        except Exception as exc:
            if is_disk_full(exc):
                self._discard()
        self.f = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def _free_mb(path: Path) -> str:
    try:
        return f"{free_bytes(path.parent) / 2**20:.1f} MB free there"
    except OSError:
        return "free space unknown"
