"""The model files beside a result JSON: written so that reading them cannot run code, found
only inside the result's own folder, and checked against the sha256 the result records.

A fitted head is a skops file (``.skops``, :func:`dump_head_model`) that
:func:`load_head_model` reads with an explicit list of trusted types
(:data:`TRUSTED_HEAD_TYPES`); a file that is not one featx wrote (a pickle, a ``.joblib``
of an older featx, a skops file holding other types) is refused with one line and never
executed. :func:`artifact_file` turns a result's ``artifacts`` entry into a path, refusing a
name that leaves the result's folder (``../x``, an absolute path, a symlink out) and a file
whose sha256 differs from ``artifacts["{key}_sha256"]``.
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from featx.errors import FeatxError
from featx.files import atomic_write

__all__ = ["HEAD_MODEL_SUFFIX", "TRUSTED_HEAD_TYPES", "ArtifactError", "artifact_file",
           "dump_head_model", "file_sha256", "load_head_model", "sha256_key"]

HEAD_MODEL_SUFFIX = ".skops"

# What featx's head pipelines hold beyond the types skops trusts by default (sklearn
# estimators, numpy arrays): found with skops.io.get_untrusted_types on heads featx wrote
# (every registered head, scaled or not, plus the PCA and streamed pipelines). A new head
# whose file holds another type fails to load in tests/test_artifacts.py until it is added.
TRUSTED_HEAD_TYPES: tuple[str, ...] = (
    "sklearn.metrics._dist_metrics.EuclideanDistance32",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
)

_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


class ArtifactError(FeatxError):
    """A model file beside a result that featx will not read: not what featx wrote, swapped
    since the result was recorded, or named outside the result's folder."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_key(key: str) -> str:
    """The ``artifacts`` key that records the sha256 of artifact ``key`` (``model_sha256``)."""
    return f"{key}_sha256"


def dump_head_model(pipeline, path: str | Path) -> str:
    """Write a fitted pipeline as skops at ``path`` (atomically); its sha256."""
    import skops.io as sio
    path = Path(path)
    with atomic_write(path) as tmp:
        sio.dump(pipeline, tmp)
    return file_sha256(path)


def load_head_model(path: str | Path):
    """The fitted pipeline in the skops file ``path``, built from trusted types only.

    Raises :class:`ArtifactError` (one line naming the file) for anything else: a pickle or
    ``.joblib`` (never unpickled), a damaged file, a skops file holding other types.
    """
    import skops.io as sio
    path = Path(path)
    if path.suffix != HEAD_MODEL_SUFFIX:
        raise ArtifactError(f"{path}: not a featx head model (featx writes {HEAD_MODEL_SUFFIX} "
                            f"files and never unpickles); re-run fit-heads to write one.")
    if not zipfile.is_zipfile(path):
        raise ArtifactError(f"{path}: not a skops file featx wrote (it was replaced or is "
                            f"damaged); it was not loaded. Re-run fit-heads.")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:
        raise ArtifactError(f"{path}: cannot be read as a skops file "
                            f"({type(exc).__name__}); it was not loaded. Re-run fit-heads.") from None
    other = sorted(set(untrusted) - set(TRUSTED_HEAD_TYPES))
    if other:
        raise ArtifactError(f"{path}: holds types featx does not write ({', '.join(other[:3])}"
                            f"{', ...' if len(other) > 3 else ''}); it was not loaded.")
    try:
        return sio.load(path, trusted=list(TRUSTED_HEAD_TYPES))
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ArtifactError(f"{path}: cannot be loaded ({type(exc).__name__}: {first}); "
                            f"re-run fit-heads.") from None


def artifact_file(result_path: str | Path, result: dict, key: str = "model", *,
                  missing: str = "re-run the command that wrote it",
                  verify: bool = True) -> Path:
    """The file that ``result["artifacts"][key]`` names, beside the result at ``result_path``.

    Refuses (:class:`ArtifactError`) a name that is not a plain file name in the result's own
    folder (``..``, an absolute path, a subfolder, a symlink), and a file whose sha256 is not the one the result records as
    ``artifacts["{key}_sha256"]`` (``verify``; False for files that are only read as text,
    such as the history CSV). A missing file raises ``FileNotFoundError`` ending in
    ``missing`` (what to do).
    """
    result_path = Path(result_path)
    artifacts = result.get("artifacts") if isinstance(result.get("artifacts"), dict) else {}
    name = artifacts.get(key)
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{result_path}: the result names no {key} file; re-run the "
                            f"command that wrote it.")
    if Path(name).is_absolute() or Path(name).name != name or name in (".", ".."):
        raise ArtifactError(f"{result_path}: its {key} file {name!r} is not a file name in the "
                            f"result's own folder; refused.")
    if Path(name).suffix in _PICKLE_SUFFIXES:
        raise ArtifactError(f"{result_path}: its {key} file {name} is a pickle, which an older "
                            f"featx wrote and featx no longer reads; re-run fit-heads.")
    folder = result_path.parent.resolve()
    path = result_path.parent / name
    if path.is_symlink() or (path.exists() and path.resolve().parent != folder):
        raise ArtifactError(f"{result_path}: its {key} file {name!r} is a link "
                            f"(to {path.resolve()}); featx reads only plain files in the "
                            f"result's own folder; refused.")
    if not path.is_file():
        raise FileNotFoundError(f"{result_path}: its {key} file {name} is missing; {missing}.")
    if not verify:
        return path
    want = artifacts.get(sha256_key(key))
    if not isinstance(want, str) or not want:
        raise ArtifactError(f"{result_path}: records no sha256 for {name} (an older featx "
                            f"wrote it); re-run the command that wrote it.")
    have = file_sha256(path)
    if have != want:
        raise ArtifactError(f"{path}: sha256 {have[:12]}... is not the {want[:12]}... its result "
                            f"{result_path.name} recorded; the file was replaced. Refused.")
    return path
