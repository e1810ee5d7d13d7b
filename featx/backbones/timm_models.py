"""timm's models as featx backbones: ``--model timm:NAME`` for any name ``timm.list_models`` knows.

:mod:`featx.backbones.registry` hands every ``timm:`` name to :func:`timm_spec` (registered below);
this module holds what only timm models need, in timm's own terms:

* ``penultimate`` is ``forward_head(forward_features(x), pre_logits=True)``, exactly as timm
  computes it (for a ViT that is timm's head pooling: the class token, or the token mean for
  ``global_pool='avg'`` models);
* the spatial map is ``forward_features(x)``: NCHW for CNNs, NHWC turned to NCHW for models
  that say ``output_fmt='NHWC'`` (Swin, ...), and for ViT-style models (tokens ``(B, T, C)``)
  the patch tokens, with the ``num_prefix_tokens`` class/register/distillation tokens
  dropped, laid back on their ``(H/p, W/p)`` grid. ``pool{n}`` is AdaptiveAvgPool2d(n) of that
  map, so for a ViT ``pool1`` is the mean of the patch tokens, which is *not* ``penultimate``;
* layers for ``extract --layers`` are timm's ``feature_info`` modules (ConvNeXt's
  ``stages.N``, a ViT's ``blocks.N``), read by ``forward_intermediates`` with ``norm=True``
  (so a ViT block's tokens get the final norm, as DINOv2's linear evaluation reads them,
  and the last one is the last map itself);
* stages for ``--freeze`` are timm's own coarse parameter groups (``model.group_matcher``,
  the groups timm uses for layer-wise learning-rate decay), in forward order;
* the eval transform is timm's resolved data config (``resolve_data_config``), recorded in
  the cache's provenance;
* weights: ``none`` (seeded random init), a timm state dict / checkpoint file, or timm's
  pretrained file when it is already in the Hugging Face hub cache (or torch's hub cache for
  the few models hosted by URL).

timm is an optional dependency (``pip install 'featx[timm]'``), imported only when a
``timm:`` model is asked for.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from featx.backbones.registry import UnknownModelError, register_source
from featx.data import DataParameterError
from featx.data.images import TransformSpec
from featx.errors import FeatxError

__all__ = ["PREFIX", "TimmSpec", "create_timm_model", "import_timm", "list_timm_models",
           "timm_spec", "timm_transform"]

PREFIX = "timm:"


def import_timm():
    """The timm package, or one line saying how to install it."""
    try:
        import timm
    except ImportError:
        raise UnknownModelError("timm models need the timm package: pip install 'featx[timm]' "
                                "(or pip install timm).") from None
    return timm


@dataclass(frozen=True)
class TimmSpec:
    """One timm model as a featx registry entry (same attributes as ``BackboneSpec``).

    ``layout`` is what ``forward_features`` returns: ``"NCHW"``, ``"NHWC"`` or ``"tokens"``
    (``(B, T, C)`` with ``num_prefix_tokens`` leading non-patch tokens). ``data_config`` is
    timm's resolved data config at the model's default size; ``stage_params`` maps each
    ``--freeze`` stage to its parameter names.
    """

    name: str
    timm_name: str
    penultimate_dim: int
    spatial_channels: int
    classifier: str
    layout: str
    data_config: dict
    pretrained_cfg: dict
    stages: tuple[str, ...]
    stage_params: dict = field(default_factory=dict)
    channels_last: bool = False
    layer_stages: tuple[str, ...] = ()
    map_layer: str | None = None
    penultimate_alias: str | None = None
    num_prefix_tokens: int = 0  # class/register tokens before the patches (ViT-style)
    builder = None
    weights_enum = None
    # not measured (benchmarks/bf16_error.py covers torchvision's models): auto runs fp32
    bf16_error = None
    bf16_measured_with = ""

    @property
    def default_image_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    # --- what the wrappers call --------------------------------------------------------------
    @staticmethod
    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_features(x)

    @staticmethod
    def head(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return model.forward_head(feats, pre_logits=True)

    def spatial(self, model: nn.Module, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output -> ``(B, C, h, w)`` map (input ``x`` gives the grid)."""
        if self.layout == "NCHW":
            return feats
        if self.layout == "NHWC":
            return feats.permute(0, 3, 1, 2)
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        tokens = feats[:, prefix:]
        h, w = _token_grid(model, tokens.shape[1], x.shape[-2:], self.name)
        # (B, h*w, C) row-major patches -> (B, C, h, w), the layout timm itself uses
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def stage_parameter_names(self, model: nn.Module, stage: str) -> list[str]:
        if stage == "":
            return [n for n, _ in model.named_parameters()]
        own = {n for n, _ in model.named_parameters()}
        return [n for n in self.stage_params[stage] if n in own]

    def drop_classifier(self, model: nn.Module) -> None:
        model.reset_classifier(0)


def _token_grid(model: nn.Module, n_tokens: int, hw, name: str) -> tuple[int, int]:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        h, w = int(hw[0]) // ph, int(hw[1]) // pw
        if h * w == n_tokens:
            return h, w
    side = math.isqrt(n_tokens)
    if side * side == n_tokens:
        return side, side
    raise FeatxError(f"{name}: cannot lay its {n_tokens} patch tokens on a grid for pool{{n}}; "
                     f"use only penultimate features (no --pool) with this model.")


# --- the spec -------------------------------------------------------------------------------

def list_timm_models(pattern: str | None = None) -> list[str]:
    """timm architecture names (without the ``timm:`` prefix), filtered by a glob pattern."""
    timm = import_timm()
    names = timm.list_models()
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern.removeprefix(PREFIX))]
    return names


def _check_name(timm_name: str) -> None:
    timm = import_timm()
    arch, _, tag = timm_name.partition(".")
    if arch and timm.is_model(arch):
        if tag and timm_name not in timm.list_pretrained(f"{arch}.*"):
            tags = ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*"))
            raise UnknownModelError(f"timm has no pretrained tag {tag!r} for {arch}; its tags: "
                                    f"{tags or 'none'} (or give timm:{arch} for the default).")
        return
    close = difflib.get_close_matches(timm_name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
    raise UnknownModelError(f"unknown timm model {timm_name!r}.{hint} Run `featx models --filter "
                            f"'PATTERN*'` to list timm's names.")


def create_timm_model(timm_name: str, **kwargs) -> nn.Module:
    return import_timm().create_model(timm_name, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=64)
def timm_spec(name: str) -> TimmSpec:
    """The registry entry for ``timm:NAME``, read off a model built on the meta device."""
    timm_name = name.removeprefix(PREFIX)
    _check_name(timm_name)
    timm = import_timm()
    try:  # the meta device allocates nothing: a ViT-g spec costs milliseconds
        with torch.device("meta"):
            model = create_timm_model(timm_name)
        meta = True
    except Exception:
        model, meta = create_timm_model(timm_name), False
    data_config = dict(timm.data.resolve_data_config({}, model=model))
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    classifier = pretrained_cfg.get("classifier") or "head"
    if isinstance(classifier, (tuple, list)):
        classifier = classifier[0]
    layout, channels, pen_dim = _probe_outputs(model, data_config, meta)
    layer_stages, map_layer, alias = _layer_stages(model, layout)
    model.reset_classifier(0)
    stage_params = _stage_groups(model)
    return TimmSpec(name=PREFIX + timm_name, timm_name=timm_name, penultimate_dim=pen_dim,
                    spatial_channels=channels, classifier=classifier, layout=layout,
                    data_config=data_config, pretrained_cfg=pretrained_cfg,
                    stages=tuple(stage_params), stage_params=stage_params,
                    channels_last=layout == "NCHW", layer_stages=layer_stages,
                    map_layer=map_layer, penultimate_alias=alias,
                    num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0))


def _layer_stages(model: nn.Module, layout: str) -> tuple[tuple[str, ...], str | None, str | None]:
    """``(layer_stages, map_layer, penultimate_alias)`` from timm's ``feature_info``.

    Only models with ``forward_intermediates`` have layers. The last one is the last map
    where timm's ``norm=True`` makes it so: a ViT-style model (its final norm on every
    block) and ConvNeXt (``norm_pre`` on the last stage); a ViT whose head reads the class
    token through no further norm has that token as its penultimate.
    """
    info = getattr(model, "feature_info", None) or []
    if not hasattr(model, "forward_intermediates") or not isinstance(info, list):
        return (), None, None
    names = tuple(str(d["module"]) for d in info if isinstance(d, dict) and "module" in d)
    if not names:
        return (), None, None
    if layout == "tokens":
        token_head = (getattr(model, "global_pool", None) == "token"
                      and isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity)
                      and int(getattr(model, "num_prefix_tokens", 0) or 0) > 0)
        return names, names[-1], "cls" if token_head else None
    if type(model).__name__ == "ConvNeXt":
        return names, names[-1], None
    return names, None, None


def _probe_outputs(model: nn.Module, data_config: dict, meta: bool) -> tuple[str, int, int]:
    """(layout, spatial channels, penultimate dim) from one forward at the default size."""
    device = "meta" if meta else "cpu"
    x = torch.zeros(1, *data_config["input_size"], device=device)
    try:
        with torch.no_grad():
            feats = model.eval().forward_features(x)
            pen = model.forward_head(feats, pre_logits=True)
        pen_dim = int(pen.shape[-1])
        if feats.ndim == 3:
            return "tokens", int(feats.shape[-1]), pen_dim
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            return "NHWC", int(feats.shape[-1]), pen_dim
        return "NCHW", int(feats.shape[1]), pen_dim
    except Exception:  # a model the meta device cannot run: timm's own attributes say it
        pen_dim = int(getattr(model, "head_hidden_size", model.num_features))
        if hasattr(model, "num_prefix_tokens"):
            return "tokens", int(model.num_features), pen_dim
        layout = "NHWC" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "NCHW"
        return layout, int(model.num_features), pen_dim


def _stage_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """timm's coarse parameter groups, in forward order, named for the modules they hold."""
    from timm.models import group_parameters
    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except Exception:  # no group_matcher: one stage per top-level child
        groups = {}
        for n, _ in model.named_parameters():
            groups.setdefault(n.split(".")[0], []).append(n)
    named: dict[str, tuple[str, ...]] = {}
    for i, params in enumerate(groups.values()):
        owners = list(dict.fromkeys(_owner(p) for p in params))
        common = os.path.commonprefix([p.split(".")[:-1] for p in params])
        if common:  # layer1.0.x, layer1.1.x -> layer1; stages.0.blocks.0.x alone -> stages.0
            label = ".".join(common[:len(owners[0].split("."))])
        else:
            label = "stem" if i == 0 else "+".join(owners)
        if label in named:
            label = f"{label}#{i}"
        named[label] = tuple(params)
    return named


def _owner(param: str) -> str:
    # blocks.3.attn.qkv.weight -> blocks.3; stages.1.blocks.0.x -> stages.1; cls_token -> cls_token
    parts = param.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0] if len(parts) > 1 else param


# --- transform ------------------------------------------------------------------------------

def timm_transform(spec: TimmSpec, image_size: int | None = None):
    """featx's :class:`~featx.data.images.TransformSpec` for timm's eval transform, and the config.

    Same operations as ``timm.data.create_transform(**config)``: resize the short side to
    ``floor(size / crop_pct)``, center crop ``size``, normalise. ``image_size`` replaces the
    crop size as ``resolve_data_config({'input_size': (3, N, N)})`` would.
    """
    cfg = dict(spec.data_config)
    if image_size is not None:
        if image_size < 16:
            raise DataParameterError("image_size", image_size, "is too small; use at least "
                                     "16.", sep=" ")
        cfg["input_size"] = (3, image_size, image_size)
    _, h, w = cfg["input_size"]
    mode = cfg.get("crop_mode") or "center"
    if h != w or mode != "center":
        raise FeatxError(f"{spec.name}: timm's eval transform for it is {mode!r} crop at "
                         f"{h}x{w}; featx reproduces square center crops only (most timm "
                         f"models); give {{image_size}} N for a square one, or pick another model.")
    crop_pct = cfg.get("crop_pct") or 0.875
    resize = math.floor(h / crop_pct)
    return TransformSpec(resize, int(h), tuple(float(v) for v in cfg["mean"]),
                         tuple(float(v) for v in cfg["std"]), str(cfg["interpolation"])), cfg


# --- weights --------------------------------------------------------------------------------

register_source(PREFIX, timm_spec)
