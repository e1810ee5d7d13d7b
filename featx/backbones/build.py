"""Building a backbone in named steps: resolve the weights, build, load, wrap for features.

:func:`resolve_run` is the step extraction, fine-tuning and predict share: device ->
precision -> weights -> transform, so the first bad option is the one reported.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from featx.backbones.engines import engine_version, fp32_engine_beats_bf16, resolve_engine
from featx.backbones.registry import BackboneSpec, bf16_keeps_features, get_backbone, is_timm
from featx.backbones.state_dicts import load_state_dict
from featx.backbones.timm_models import timm_transform
from featx.backbones.timm_weights import build_timm_model
from featx.backbones.weights import ResolvedWeights, resolve_weights, weights_transform_source
from featx.data.images import TransformSpec
from featx.distributed import DistEnv, local_device
from featx.runtime import resolve_device, resolve_precision

__all__ = ["FeatureModel", "RunSetup", "backbone_provenance", "backbone_transform",
           "build_backbone", "pool_notes", "resolve_run"]


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
        return build_timm_model(spec, weights.path, seed=weights.seed, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(weights.seed)
        model = spec.builder(weights=None, **spec.build_kwargs)
    if weights.path is not None:
        load_state_dict(spec, model, weights.path)
    return model.eval()


def backbone_transform(name: str, weights: ResolvedWeights, image_size: int | None = None):
    """The eval :class:`~featx.data.images.TransformSpec` for ``name`` with ``weights``.

    torchvision: the weights entry's own transform; timm: timm's resolved data config.
    ``image_size`` replaces the crop (resize scaled the way the model's family does it).
    """
    if is_timm(name):
        return timm_transform(get_backbone(name), image_size)[0]
    return TransformSpec.from_weights(weights_transform_source(name, weights), image_size)


def backbone_provenance(name: str, image_size: int | None = None) -> dict:
    """Extra provenance entries for ``name``: for timm models timm's version, the resolved
    data config and the pretrained tag; nothing for torchvision models."""
    if not is_timm(name):
        return {}
    import timm
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

# --- the step extraction, fine-tuning and predict share ----------------------------------

@dataclass(frozen=True)
class RunSetup:
    """What :func:`resolve_run` resolved: where, in what precision and by which engine to run
    (featx/backbones/engines.py), which weights, and the transform that goes with them
    (``transform.crop`` pixels square)."""

    device: torch.device
    precision: str
    weights: ResolvedWeights
    transform: TransformSpec
    engine: str = "torch"

    @property
    def engine_version(self) -> str:
        return engine_version(self.engine)


def resolve_run(model: str, weights: str = "imagenet", *, device: str = "auto",
          precision: str = "auto", image_size: int | None = None, seed: int = 0,
          env: DistEnv | None = None, engine: str = "torch", frozen: bool = True) -> RunSetup:
    """Device -> precision -> engine -> weights -> transform for ``model``, in that order (so
    the first bad option is the one reported). Under torchrun (``env`` joined) a CUDA device
    is this process's ``cuda:LOCAL_RANK``. ``seed`` draws random init (``weights="none"``).

    ``precision="auto"`` takes bf16 only for a model whose recorded bf16 error is within
    the bound (:func:`~featx.backbones.registry.bf16_keeps_features`), and fp32 when an
    fp32-only engine (onnxruntime, openvino) is asked for by name or, with ``engine="auto"``,
    would be faster (:func:`~featx.backbones.engines.fp32_engine_beats_bf16`). Those rules
    are about frozen features: fine-tuning (``frozen=False``) trains in mixed precision
    wherever bf16 is native, whatever the model.
    """
    dev = resolve_device(device)
    if env is not None:
        dev = local_device(dev, env)
    # bf16 where it keeps the features, and where torch's bf16 is the fastest choice: not
    # with an fp32-only engine asked for by name, nor (both auto) on a CPU without AMX
    # where an installed engine's fp32 ran faster (BENCHMARKS.md, "Engines")
    bf16_ok = not frozen or bf16_keeps_features(get_backbone(model)) and (
        engine == "torch" or engine == "auto" and not fp32_engine_beats_bf16(dev))
    prec = resolve_precision(precision, dev, bf16_ok=bf16_ok)
    eng = resolve_engine(engine, dev, prec)
    resolved = resolve_weights(model, weights, seed=seed)
    return RunSetup(dev, prec, resolved, backbone_transform(model, resolved, image_size), eng)


def pool_notes(map_hw: tuple[int, int], crop: int, pools, model: str) -> list[str]:
    """Notes for the pool sizes larger than the last spatial map, ``map_hw`` = ``(h, w)``.

    ``AdaptiveAvgPool2d(n)`` of an ``h x w`` map with ``n > h`` repeats map values instead of
    averaging them, so such a feature is wider without holding more. It is kept (a 1x1 map
    at a small image size is common, and the numbers are well defined), but said.
    """
    h, w = map_hw
    big = [n for n in pools if n > min(h, w)]
    if not big:
        return []
    return [f"note: --pool {','.join(map(str, big))} is larger than {model}'s last spatial map "
            f"at {crop} px ({h}x{w}): those pool features repeat the map's values and hold no "
            f"more than pool{min(h, w)}. A larger --image-size gives a larger map."]
