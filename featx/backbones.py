"""The backbone registry: how each model is built, its weights, and where its features are.

Nothing else in featx checks model names. Each entry knows, for one torchvision model (or,
through :mod:`featx.timm_backbones`, any timm model named ``timm:NAME``):

* how to build it (with the same constructor arguments its ImageNet weights need);
* ``forward_features``: the last spatial map, i.e. the tensor the model itself pools
  globally (ResNet ``layer4``, VGG ``features``, DenseNet ``relu(features)``, ...);
* ``forward_head(pre_logits=True)``: from that map to the penultimate vector, i.e. exactly
  the input of the model's final classification ``Linear`` (in eval mode);
* where that final ``Linear`` lives, so fine-tuning can replace it;
* the ordered stages of its trunk, so fine-tuning can freeze "up to and including" one.

Weights are resolved in named steps (:func:`resolve_weights`), then the model is built
(:func:`build_backbone`) and wrapped (:class:`FeatureModel`) to return both outputs of one
forward pass.
"""
from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from featx.errors import FeatxError, ParameterError
from featx.files import atomic_write

__all__ = [
    "BackboneSpec",
    "FeatureModel",
    "ResolvedWeights",
    "UnknownModelError",
    "WeightsError",
    "backbone_provenance",
    "backbone_transform",
    "build_backbone",
    "check_state_dict",
    "describe_weights_availability",
    "weights_transform_source",
    "get_backbone",
    "hub_checkpoint_path",
    "import_weights",
    "is_timm",
    "list_backbones",
    "resolve_weights",
]


class UnknownModelError(FeatxError):
    """A model name that is not in the registry."""


class WeightsError(FeatxError, RuntimeError):
    """Weights that cannot be found, loaded or matched to the model."""


class _WeightsValueError(ParameterError, WeightsError):
    """A ``weights`` value that names no weights."""


@dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    Attributes
    ----------
    name : str
        The featx/torchvision name, e.g. ``"resnet50"``.
    builder : callable
        torchvision's constructor, e.g. ``torchvision.models.resnet50``.
    weights_enum : type
        The torchvision weights enum; its ``DEFAULT`` is featx's ``imagenet``.
    penultimate_dim : int
        Length of the penultimate vector (input of the final ``Linear``).
    spatial_channels : int
        Channels ``C`` of the last spatial map; ``pool{n}`` has ``C*n*n`` values.
    classifier : str
        Dotted path of the final ``Linear`` inside the torchvision model.
    features : callable
        ``features(model, x) -> (B, C, H, W)`` last spatial map.
    head : callable
        ``head(model, fmap) -> (B, penultimate_dim)``, eval-mode pre-logits.
    stages : tuple of str
        Trunk stages in forward order (dotted module paths), for partial freezing.
    build_kwargs : dict
        Constructor arguments that make the architecture match the ImageNet weights.
    """

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type
    penultimate_dim: int
    spatial_channels: int
    classifier: str
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    head: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    stages: tuple[str, ...]
    build_kwargs: dict = field(default_factory=dict)
    # Keys present in torchvision's checkpoint that the built model does not use.
    ignore_keys: tuple[str, ...] = ()

    @property
    def default_weights(self):
        return self.weights_enum.DEFAULT

    @property
    def default_image_size(self) -> int:
        return int(self.default_weights.transforms().crop_size[0])

    # channels-last pays on every torchvision model once its BatchNorms are folded
    channels_last = True

    def spatial(self, model: nn.Module, fmap: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``features`` output -> ``(B, C, h, w)`` map; for torchvision models it already is."""
        return fmap

    def stage_parameter_names(self, model: nn.Module, stage: str) -> list[str]:
        """Parameter names of ``stage`` (``""``: the whole model), for freezing."""
        prefix = f"{stage}." if stage else ""
        return [prefix + n for n, _ in model.get_submodule(stage).named_parameters()]

    def drop_classifier(self, model: nn.Module) -> None:
        """Replace the final ``Linear`` by ``Identity`` (fine-tuning puts a new head on)."""
        parent, _, leaf = self.classifier.rpartition(".")
        setattr(model.get_submodule(parent), leaf, nn.Identity())


_REGISTRY: dict[str, BackboneSpec] = {}


def _register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


# --- how each family reaches its features -------------------------------------------------

def _resnet_features(m, x):
    x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
    return m.layer4(m.layer3(m.layer2(m.layer1(x))))


def _resnet_head(m, f):
    return torch.flatten(m.avgpool(f), 1)


def _sequential_features(m, x):
    return m.features(x)


def _vgg_head(m, f):
    # classifier[:-1] = Linear, ReLU, Dropout, Linear, ReLU, Dropout -> 4096
    return m.classifier[:-1](torch.flatten(m.avgpool(f), 1))


def _avgpool_classifier_head(m, f):
    # MobileNetV3 / EfficientNet: avgpool, flatten, classifier[:-1]
    return m.classifier[:-1](torch.flatten(m.avgpool(f), 1))


def _mobilenet_v2_head(m, f):
    return m.classifier[:-1](torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1))


def _densenet_features(m, x):
    # DenseNet applies a ReLU after `features` and pools that: it is the spatial map.
    return F.relu(m.features(x))


def _densenet_head(m, f):
    return torch.flatten(F.adaptive_avg_pool2d(f, (1, 1)), 1)


_GOOGLENET_TRUNK = ("conv1", "maxpool1", "conv2", "conv3", "maxpool2", "inception3a",
                    "inception3b", "maxpool3", "inception4a", "inception4b", "inception4c",
                    "inception4d", "inception4e", "maxpool4", "inception5a", "inception5b")


def _googlenet_features(m, x):
    x = m._transform_input(x)
    for name in _GOOGLENET_TRUNK:
        x = getattr(m, name)(x)
    return x


def _googlenet_head(m, f):
    return m.dropout(torch.flatten(m.avgpool(f), 1))


_SHUFFLENET_TRUNK = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")


def _shufflenet_features(m, x):
    for name in _SHUFFLENET_TRUNK:
        x = getattr(m, name)(x)
    return x


def _shufflenet_head(m, f):
    return f.mean([2, 3])


_RESNET_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def _indexed(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}.{i}" for i in range(n))


for _name, _builder, _enum, _dim in [
    ("resnet18", models.resnet18, models.ResNet18_Weights, 512),
    ("resnet34", models.resnet34, models.ResNet34_Weights, 512),
    ("resnet50", models.resnet50, models.ResNet50_Weights, 2048),
    ("resnet101", models.resnet101, models.ResNet101_Weights, 2048),
]:
    _register(BackboneSpec(_name, _builder, _enum, _dim, _dim, "fc",
                           _resnet_features, _resnet_head, _RESNET_STAGES))

_register(BackboneSpec("vgg16", models.vgg16, models.VGG16_Weights, 4096, 512, "classifier.6",
                       _sequential_features, _vgg_head, _indexed("features", 31)))
_register(BackboneSpec("vgg16_bn", models.vgg16_bn, models.VGG16_BN_Weights, 4096, 512,
                       "classifier.6", _sequential_features, _vgg_head, _indexed("features", 44)))
_register(BackboneSpec("googlenet", models.googlenet, models.GoogLeNet_Weights, 1024, 1024, "fc",
                       _googlenet_features, _googlenet_head, _GOOGLENET_TRUNK,
                       build_kwargs={"aux_logits": False, "transform_input": True,
                                     "init_weights": True},
                       ignore_keys=("aux1.", "aux2.")))
for _name, _builder, _enum in [
    ("shufflenet_v2_x1_0", models.shufflenet_v2_x1_0, models.ShuffleNet_V2_X1_0_Weights),
    ("shufflenet_v2_x2_0", models.shufflenet_v2_x2_0, models.ShuffleNet_V2_X2_0_Weights),
]:
    _dim = 1024 if _name.endswith("1_0") else 2048
    _register(BackboneSpec(_name, _builder, _enum, _dim, _dim, "fc", _shufflenet_features,
                           _shufflenet_head, _SHUFFLENET_TRUNK))
_register(BackboneSpec("mobilenet_v2", models.mobilenet_v2, models.MobileNet_V2_Weights, 1280,
                       1280, "classifier.1", _sequential_features, _mobilenet_v2_head,
                       _indexed("features", 19)))
_register(BackboneSpec("mobilenet_v3_large", models.mobilenet_v3_large,
                       models.MobileNet_V3_Large_Weights, 1280, 960, "classifier.3",
                       _sequential_features, _avgpool_classifier_head, _indexed("features", 17)))
_register(BackboneSpec("densenet121", models.densenet121, models.DenseNet121_Weights, 1024, 1024,
                       "classifier", _densenet_features, _densenet_head,
                       ("features.conv0", "features.norm0", "features.relu0", "features.pool0",
                        "features.denseblock1", "features.transition1", "features.denseblock2",
                        "features.transition2", "features.denseblock3", "features.transition3",
                        "features.denseblock4", "features.norm5")))
_register(BackboneSpec("efficientnet_b0", models.efficientnet_b0, models.EfficientNet_B0_Weights,
                       1280, 1280, "classifier.1", _sequential_features, _avgpool_classifier_head,
                       _indexed("features", 9)))


# --- lookups ----------------------------------------------------------------------------------

def list_backbones() -> list[str]:
    """Names of every registered backbone, sorted."""
    return sorted(_REGISTRY)


def is_timm(name: str) -> bool:
    """Whether ``name`` is a ``timm:NAME`` model (served by :mod:`featx.timm_backbones`)."""
    return name.startswith("timm:")


def get_backbone(name: str) -> BackboneSpec:
    """The registry entry for ``name``; an unknown name suggests close ones.

    ``timm:NAME`` gives a :class:`~featx.timm_backbones.TimmSpec`, which has the same
    attributes and methods.
    """
    if is_timm(name):
        from featx.timm_backbones import timm_spec
        return timm_spec(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Run `featx models` to list the "
            f"{len(_REGISTRY)} available ones, or give any timm model as timm:NAME.") from None


# --- weights ----------------------------------------------------------------------------------

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
        from featx.timm_backbones import timm_pretrained_file
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
        from featx.timm_backbones import timm_pretrained_file
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


def check_state_dict(model: nn.Module, state: dict, path, name: str) -> None:
    """Raise one :class:`WeightsError` line when ``state`` (from the file ``path``) does not
    fit ``model``: counts of shape mismatches, missing and unexpected keys, with an example."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: file "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise WeightsError(f"{path} does not fit {name}: " + "; ".join(parts) + ".")


def _load_state_dict(spec: BackboneSpec, model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}".splitlines()[0]) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a featx/torchvision-reference checkpoint
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.startswith(spec.ignore_keys or ("\0",))}
    check_state_dict(model, state, path, spec.name)
    model.load_state_dict(state)


def build_backbone(name: str, weights: ResolvedWeights | str = "imagenet", *,
                   seed: int = 0, image_size: int | None = None) -> nn.Module:
    """Build ``name`` with ``weights`` loaded, in eval mode, on the CPU.

    The architecture is always the one the ImageNet weights need (e.g. GoogLeNet with
    ``transform_input=True`` and no auxiliary heads), whatever the weights. ``image_size``
    (the crop, pixels) matters only for timm models with a fixed input size (ViTs): they
    are built for it; default: the model's own.
    """
    spec = get_backbone(name)
    if isinstance(weights, str):
        weights = resolve_weights(name, weights, seed=seed)
    if is_timm(name):
        from featx.timm_backbones import build_timm_model
        return build_timm_model(spec, weights.path, seed=weights.seed, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.seed)
        model = spec.builder(weights=None, **spec.build_kwargs)
    if weights.path is not None:
        _load_state_dict(spec, model, weights.path)
    return model.eval()


def import_weights(path: str | Path, name: str) -> Path:
    """Check that ``path`` loads into ``name``, then copy it to where torchvision looks."""
    spec = get_backbone(name)
    if is_timm(name):
        raise WeightsError(f"featx weights import is for torchvision models; pass a timm file "
                           f"directly: --model {name} --weights {path}.")
    model = spec.builder(weights=None, **spec.build_kwargs)
    _load_state_dict(spec, model, str(path))
    # keep torchvision's own file name when the file is one of its releases (e.g. V1 vs V2)
    known = {os.path.basename(w.url): w for w in spec.weights_enum}
    target = hub_checkpoint_path(name, known.get(Path(path).name))
    with atomic_write(target) as tmp:
        tmp.write_bytes(Path(path).read_bytes())
    return target


def backbone_transform(name: str, weights: ResolvedWeights, image_size: int | None = None):
    """The eval :class:`~featx.images.TransformSpec` for ``name`` with ``weights``.

    torchvision: the weights entry's own transform; timm: timm's resolved data config.
    ``image_size`` replaces the crop (resize scaled the way the model's family does it).
    """
    from featx.images import TransformSpec
    if is_timm(name):
        from featx.timm_backbones import timm_transform
        return timm_transform(get_backbone(name), image_size)[0]
    return TransformSpec.from_weights(weights_transform_source(name, weights), image_size)


def backbone_provenance(name: str, image_size: int | None = None) -> dict:
    """Extra provenance entries for ``name``: for timm models timm's version, the resolved
    data config and the pretrained tag; nothing for torchvision models."""
    if not is_timm(name):
        return {}
    import timm
    from featx.timm_backbones import timm_transform
    spec = get_backbone(name)
    cfg = timm_transform(spec, image_size)[1]
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return {"timm_version": timm.__version__,
            "timm_data_config": {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in cfg.items() if k in keys},
            "timm_pretrained_tag": spec.pretrained_cfg.get("tag") or "",
            "feature_layout": spec.layout}


# --- the feature wrapper ----------------------------------------------------------------------

class FeatureModel(nn.Module):
    """A frozen backbone returning ``(spatial_map, penultimate)`` from one forward pass.

    Input ``(B, 3, H, W)`` normalised images; outputs ``(B, C, h, w)`` and
    ``(B, penultimate_dim)``. For ViT-style timm models the map is the patch tokens on
    their grid (class/register tokens dropped), while penultimate is timm's head pooling.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.features(self.model, x)

    def forward_head(self, fmap: torch.Tensor, pre_logits: bool = True) -> torch.Tensor:
        z = self.spec.head(self.model, fmap)
        if pre_logits:
            return z
        return self.model.get_submodule(self.spec.classifier)(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.forward_features(x)
        return self.spec.spatial(self.model, feats, x), self.forward_head(feats)
