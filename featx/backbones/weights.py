"""Finding and checking a backbone's weights: ImageNet from torch's hub cache, a file, or none.

:func:`resolve_weights` decides, before anything is built, which weights a model gets and
hashes them (sha256, memoised beside the hub checkpoints); :func:`import_weights` checks a
file against its model and puts it where torchvision looks. The models themselves, and how
weights are loaded into them, are :mod:`featx.backbones`'s.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from featx.backbones.registry import BackboneSpec, WeightsError, get_backbone, is_timm
from featx.backbones.state_dicts import load_state_dict
from featx.backbones.timm_weights import timm_pretrained_file
from featx.errors import ParameterError
from featx.files import atomic_write

__all__ = [
    "ResolvedWeights",
    "describe_weights_availability",
    "hub_checkpoint_path",
    "import_weights",
    "resolve_weights",
    "weights_transform_source",
]


class _WeightsValueError(ParameterError, WeightsError):
    """A ``weights`` value that names no weights."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Which weights a backbone gets, decided before anything is built.

    ``kind`` is ``"imagenet"``, ``"none"`` or ``"file"``; ``path`` is the file that is loaded
    (hub cache or user file), ``sha256`` its hash (or ``"none-seed{N}"`` for random init).
    ``source`` says in words where they came from, for the user and the cache provenance.
    """

    kind: str
    path: str | None
    sha256: str
    source: str
    seed: int = 0
    # torchvision weights entry whose transform applies (e.g. "MobileNet_V2_Weights.IMAGENET1K_V1")
    version: str | None = None

    @property
    def tag(self) -> str:
        """Short name used in cache file names."""
        if self.kind == "file":
            return "file-" + self.sha256[:8]
        return self.kind


def hub_checkpoint_path(name: str, weights=None) -> Path:
    """Where torchvision keeps (or would download) ``name``'s ImageNet weights file.

    ``weights`` is a torchvision weights entry; default: the model's ``DEFAULT``.
    """
    url = (weights or get_backbone(name).default_weights).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _available_imagenet(name: str):
    """The best ImageNet weights entry whose file is in the hub cache (DEFAULT first)."""
    spec = get_backbone(name)
    entries = [spec.default_weights] + [w for w in spec.weights_enum
                                        if w is not spec.default_weights]
    for w in entries:
        if hub_checkpoint_path(name, w).is_file():
            return w
    return None


def describe_weights_availability(name: str) -> str | None:
    """The ImageNet weights entry available offline for ``name`` (e.g. ``IMAGENET1K_V1``;
    for timm models the pretrained tag, e.g. ``augreg_in21k_ft_in1k``)."""
    if is_timm(name):
        spec = get_backbone(name)
        try:
            timm_pretrained_file(spec)
        except WeightsError:
            return None
        return spec.pretrained_cfg.get("tag") or "pretrained"
    w = _available_imagenet(name)
    return None if w is None else str(w).split(".")[-1]


def weights_transform_source(name: str, weights: "ResolvedWeights"):
    """The torchvision weights entry whose eval transform goes with ``weights``
    (torchvision models only; :func:`backbone_transform` serves every model)."""
    spec = get_backbone(name)
    if weights.version:
        return spec.weights_enum[weights.version.split(".")[-1]]
    return spec.default_weights


_HASH_MEMO: dict[str, tuple[list, str]] = {}
_HASH_MEMO_FILE = "featx-sha256.json"  # in torch's hub folder, beside the checkpoints
_HASH_MEMO_MAX = 256


def _file_identity(path: Path) -> list:
    """What changes whenever the file's bytes may have: any write moves mtime and ctime,
    and ctime cannot be set back by the user (``touch -d`` can only reset mtime)."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    """sha256 of a weights file, computed once per file identity (:func:`_file_identity`).

    Every command resolves its weights to record and compare the hash, so a re-run that
    finds everything done would otherwise read the whole file each time (resnet50: 98 MB).
    The hash is memoised in this process and in ``{torch hub dir}/featx-sha256.json``;
    writing that memo is best effort (a read-only folder only means hashing again).
    """
    key = str(Path(path).resolve())
    ident = _file_identity(path)
    memo_path = Path(torch.hub.get_dir()) / _HASH_MEMO_FILE
    if key not in _HASH_MEMO or _HASH_MEMO[key][0] != ident:
        _HASH_MEMO.update(_read_hash_memo(memo_path))
    hit = _HASH_MEMO.get(key)
    if hit is not None and hit[0] == ident:
        return hit[1]
    digest = _hash_file(path)
    if _file_identity(path) == ident:  # not rewritten while it was read
        _HASH_MEMO[key] = (ident, digest)
        _write_hash_memo(memo_path, key, ident, digest)
    return digest


def _read_hash_memo(memo_path: Path) -> dict[str, tuple[list, str]]:
    import json
    try:
        raw = json.loads(memo_path.read_text())
        return {k: (list(v["id"]), str(v["sha256"])) for k, v in raw.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}  # absent or damaged: the hash is only recomputed


def _write_hash_memo(memo_path: Path, key: str, ident: list, digest: str) -> None:
    import json
    memo = _read_hash_memo(memo_path)
    memo.pop(key, None)
    memo[key] = (ident, digest)
    keep = list(memo.items())[-_HASH_MEMO_MAX:]  # newest last; old entries fall off
    try:
        with atomic_write(memo_path) as tmp:
            tmp.write_text(json.dumps({k: {"id": i, "sha256": d} for k, (i, d) in keep}))
    except OSError:
        pass  # a read-only or full hub folder: the memo only saves time


def _offline() -> bool:
    return os.environ.get("FEATX_OFFLINE", "") not in ("", "0")


def resolve_weights(name: str, weights: str = "imagenet", *, seed: int = 0) -> ResolvedWeights:
    """Decide which weights ``name`` gets: ``"imagenet"``, ``"none"`` or a ``.pth`` path.

    ImageNet weights come from torch's hub cache; when they are not there and the machine is
    online (``FEATX_OFFLINE`` unset), torchvision downloads them. When that is impossible a
    :class:`WeightsError` says which file is expected, where, and the alternatives.
    """
    spec = get_backbone(name)
    if weights == "none":
        return ResolvedWeights("none", None, f"none-seed{seed}", f"random init (seed {seed})", seed)
    if weights == "imagenet" and is_timm(name):
        target = timm_pretrained_file(spec, download=not _offline())
        tag = spec.pretrained_cfg.get("tag") or "pretrained"
        return ResolvedWeights("imagenet", str(target), _sha256(target),
                               f"timm {spec.timm_name}.{tag} from {target}",
                               version=f"{spec.timm_name}.{tag}")
    if weights == "imagenet":
        entry = _available_imagenet(name)
        if entry is None:
            entry = spec.default_weights
            _download(spec, hub_checkpoint_path(name))
        target = hub_checkpoint_path(name, entry)
        return ResolvedWeights("imagenet", str(target), _sha256(target),
                               f"torchvision {entry} from {target}", version=str(entry))
    path = Path(weights)
    if not path.is_file():
        raise _WeightsValueError("weights", weights, "is neither 'imagenet', 'none' nor an "
                                 "existing .pth file.", sep=" ")
    kind = "timm state dict" if is_timm(name) else "state dict"
    return ResolvedWeights("file", str(path.resolve()), _sha256(path), f"{kind} {path}")


def _download(spec: BackboneSpec, target: Path) -> None:
    message = (f"ImageNet weights for {spec.name} are not available offline: torchvision expects "
               f"{target.name} in {target.parent} (set TORCH_HOME to move it). Put the file there "
               f"(or `featx weights import FILE --model {spec.name}`), or use --weights none "
               f"(random init) or --weights FILE.")
    if _offline():
        raise WeightsError(message)
    try:
        torch.hub.load_state_dict_from_url(spec.default_weights.url, progress=True,
                                           check_hash=True)
    except Exception as exc:  # network errors come in many types; all mean "not available"
        raise WeightsError(f"{message} (download failed: {type(exc).__name__})") from None


def import_weights(path: str | Path, name: str) -> Path:
    """Check that ``path`` loads into ``name``, then copy it to where torchvision looks."""
    spec = get_backbone(name)
    if is_timm(name):
        raise WeightsError(f"featx weights import is for torchvision models; pass a timm file "
                           f"directly: --model {name} --weights {path}.")
    model = spec.builder(weights=None, **spec.build_kwargs)
    load_state_dict(spec, model, str(path))
    # keep torchvision's own file name when the file is one of its releases (e.g. V1 vs V2)
    known = {os.path.basename(w.url): w for w in spec.weights_enum}
    target = hub_checkpoint_path(name, known.get(Path(path).name))
    with atomic_write(target) as tmp:
        tmp.write_bytes(Path(path).read_bytes())
    return target
