"""Intermediate layers: which of a model's modules ``extract --layers`` reads, what it stores
of each, and the one module that returns every requested layer x pool from a single forward.

* torchvision models: a forward hook on each requested module keeps its output while the
  model runs its own forward once (the same tensor torchvision's
  ``create_feature_extractor`` returns for that module name: the output of its last
  operation). A module called more than once per forward (a ResNet block's shared ``relu``)
  is refused: a hook could not say which call is meant.
* timm models: ``forward_intermediates(x, indices, norm=True)``, timm's own facility, whose
  final output is ``forward_features`` (so the penultimate and the last map come from the
  same pass). The layers are timm's ``feature_info`` modules.

What is stored of a layer (:func:`layer_plan`): ``LAYER.pool{n}`` for every pool size, and for
a ViT block also ``LAYER.cls``, its class token (``LAYER.pool1`` is then its mean patch
token). ``last4`` is DINOv2's linear-evaluation input. A feature equal to another one (the
last stage's ``pool{n}`` *is* the last map's; ``pool1`` *is* ``penultimate`` for a head that is
a global average pool) is stored once, under the first name, and the other names are
recorded as aliases of it (the registry says which: ``map_layer``, ``penultimate_alias``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featx.backbones.build import FeatureModel
from featx.backbones.registry import BackboneSpec, get_backbone, is_timm
from featx.errors import FeatxError, ParameterError
from featx.features import (CLS, LAST4, MAP, PENULTIMATE, feature_name, layer_feature, layer_of,
                            pool_of)

__all__ = ["LAST4", "STAGES", "LayerFeatures", "LayerPlan", "layer_notes", "layer_plan",
           "list_layers", "parse_layers"]

STAGES = "stages"


def parse_layers(text: str | tuple | list | None) -> tuple[str, ...]:
    """``"layer2, layer3"`` -> ``("layer2", "layer3")``; ``""`` or ``None`` -> ``()``."""
    if text is None:
        return ()
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(dict.fromkeys(p.strip() for p in parts if p and p.strip()))


@dataclass(frozen=True)
class LayerPlan:
    """What one extraction stores, in order, and where each feature comes from.

    Attributes
    ----------
    model : str
    layers : tuple of str
        Modules read besides the last map, in forward order.
    pools : tuple of int
        Pool sizes of the last map (the cache's ``pools``).
    layer_pools : tuple of int
        Pool sizes of every layer: ``pools``, or ``(1,)`` when that is empty.
    last4 : bool
        Whether ``last4`` is stored.
    names : tuple of str
        The stored features, in the order :class:`LayerFeatures` returns them.
    sources : dict
        ``{stored name: (layer, kind)}``, ``layer`` ``""`` for the last map and the
        penultimate; ``kind`` ``penultimate``, ``pool{n}``, ``cls`` or ``last4``.
    aliases : dict
        ``{requested name: stored name}`` for requested features stored under another name.
    dims : dict
        ``{stored name: width}``.
    map_hw : dict
        ``{layer: (h, w)}`` of every map read, ``""`` the last map (only when layers are
        read: without them no probe runs, and :attr:`LayerFeatures.last_map_hw` says it).
    """

    model: str
    layers: tuple[str, ...]
    pools: tuple[int, ...]
    layer_pools: tuple[int, ...]
    last4: bool
    names: tuple[str, ...]
    sources: dict
    aliases: dict
    dims: dict
    map_hw: dict

    @property
    def features(self) -> tuple[str, ...]:
        """The stored names heads fit: all but the kept maps."""
        return tuple(n for n in self.names if self.sources[n][1] != MAP)

    @property
    def maps(self) -> dict[str, tuple[int, int, int]]:
        """``{name: (C, h, w)}`` of the kept maps (``--keep-map``)."""
        return {n: (self.dims[n] // (h * w), h, w) for n in self.names
                if self.sources[n][1] == MAP
                for h, w in [self.map_hw[self.sources[n][0]]]}

    def last4_layers(self, spec: BackboneSpec) -> tuple[str, ...]:
        return tuple(spec.layer_stages[-4:]) if self.last4 else ()


# --- the module --------------------------------------------------------------------------------

def _keep(store: dict, name: str, module, inputs, output) -> None:
    store[name] = output


class LayerFeatures(nn.Module):
    """The frozen features of every layer and pool of ``plan`` from one forward of ``network``.

    ``forward(x)`` takes ``(B, 3, H, W)`` normalised images and returns a dict
    ``{name: (B, plan.dims[name]) float32}`` with the keys in ``plan.names`` order
    (``penultimate``, the last map's ``pool{n}``, then each layer's ``cls`` and ``pool{n}`` in
    forward order, then ``last4``). Pools are computed in fp32 (averaging many bf16 values
    loses precision for no speed gain). This is the module extraction and predict run and an
    engine exports.
    """

    def __init__(self, network: FeatureModel, plan: LayerPlan):
        super().__init__()
        self.network = network
        self.plan = plan
        spec = network.spec
        self._timm = is_timm(plan.model)
        self._maps: dict = {}
        self.last_map_hw: tuple | None = plan.map_hw.get("")  # (h, w) of the last map
        read = tuple(dict.fromkeys(plan.layers + plan.last4_layers(spec)))
        if self._timm:
            order = {name: i for i, name in enumerate(spec.layer_stages)}
            self._read = tuple(sorted(read, key=order.__getitem__))
            self._indices = [order[name] for name in self._read]
        else:
            self._read, self._indices = read, []
            for layer in read:  # hooks on the modules as they are now (BatchNorms folded)
                network.model.get_submodule(layer).register_forward_hook(
                    functools.partial(_keep, self._maps, layer))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        maps, prefix, pen = self._forward_once(x)
        self.last_map_hw = tuple(int(v) for v in maps[""].shape[-2:])
        spec = self.network.spec
        floats: dict = {}

        def fl(layer):  # one fp32 copy per map, however many pools read it
            if layer not in floats:
                floats[layer] = maps[layer].float()
            return floats[layer]

        out = {}
        for name in self.plan.names:
            layer, kind = self.plan.sources[name]
            if kind == PENULTIMATE:
                out[name] = pen.float()
            elif kind == CLS:
                out[name] = prefix[layer][:, 0].float()
            elif kind == MAP:  # the map itself, channel-major (C, h, w) flattened
                out[name] = fl(layer).flatten(1)
            elif kind == LAST4:
                last = self.plan.last4_layers(spec)
                out[name] = torch.cat([prefix[b][:, 0].float() for b in last]
                                      + [fl(last[-1]).mean((2, 3))], 1)
            else:
                out[name] = F.adaptive_avg_pool2d(fl(layer), pool_of(kind)).flatten(1)
        return out

    def _forward_once(self, x):
        """``({layer: (B, C, h, w)}, {layer: (B, P, C) prefix tokens}, penultimate)``."""
        net, spec = self.network, self.network.spec
        prefix: dict = {}
        if self._timm and self._indices:
            kwargs = {"return_prefix_tokens": True} if spec.layout == "tokens" else {}
            final, inter = net.model.forward_intermediates(
                x, indices=self._indices, norm=True, output_fmt="NCHW", **kwargs)
            maps = {}
            for layer, value in zip(self._read, inter):
                if isinstance(value, (tuple, list)):
                    value, prefix[layer] = value
                maps[layer] = value
            maps[""] = spec.spatial(net.model, final, x)
            return maps, prefix, spec.head(net.model, final)
        fmap, pen = net(x)
        maps = dict(self._maps)
        self._maps.clear()  # the hooks' tensors are not kept beyond this batch
        maps[""] = fmap
        return maps, prefix, pen


# --- what to store ----------------------------------------------------------------------------

def _meta_network(spec: BackboneSpec, image_size: int) -> FeatureModel:
    """The model's skeleton on the meta device: shapes without weights or compute."""
    if is_timm(spec.name):
        from featx.backbones.timm_models import create_timm_model
        kwargs = {}
        if spec.layout == "tokens" and image_size != spec.default_image_size:
            kwargs["img_size"] = image_size
        with torch.device("meta"):
            model = create_timm_model(spec.timm_name, **kwargs)
    else:
        with torch.device("meta"):
            model = spec.builder(weights=None, **spec.build_kwargs)
    return FeatureModel(spec, model.eval())


@functools.lru_cache(maxsize=32)
def _probe(model: str, image_size: int) -> tuple[dict, dict, tuple]:
    """``({module: output shape}, {module: calls}, last map shape)`` of one meta forward.

    torchvision: every module of the model (hooks count its calls); timm: its
    ``feature_info`` layers through ``forward_intermediates``.
    """
    spec = get_backbone(model)
    net = _meta_network(spec, image_size)
    x = torch.zeros(1, 3, image_size, image_size, device="meta")
    shapes: dict = {}
    calls: dict = {}
    with torch.no_grad():
        if is_timm(model):
            if not spec.layer_stages:
                return {}, {}, tuple(net(x)[0].shape)
            kwargs = {"return_prefix_tokens": True} if spec.layout == "tokens" else {}
            final, inter = net.model.forward_intermediates(x, norm=True, output_fmt="NCHW",
                                                           **kwargs)
            for name, value in zip(spec.layer_stages, inter):
                value = value[0] if isinstance(value, (tuple, list)) else value
                shapes[name], calls[name] = tuple(value.shape), 1
            return shapes, calls, tuple(spec.spatial(net.model, final, x).shape)

        def count(name, module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
        for name, module in net.model.named_modules():
            if name:
                module.register_forward_hook(functools.partial(count, name))
        fmap, _ = net(x)
    return shapes, calls, tuple(fmap.shape)


def list_layers(model: str, image_size: int | None = None) -> list[tuple[str, tuple, bool]]:
    """``(name, (C, h, w), is_stage)`` of every module ``--layers`` accepts, in forward order:
    each module run once per forward whose output is a spatial map, at ``image_size``
    [default: the model's]."""
    spec = get_backbone(model)
    size = image_size or spec.default_image_size
    shapes, calls, _ = _probe(model, size)
    stages = set(spec.layer_stages)
    return [(name, shape[1:], name in stages) for name, shape in shapes.items()
            if calls.get(name) == 1 and shape is not None and len(shape) == 4]


def _resolve(spec: BackboneSpec, layers: tuple[str, ...], size: int) -> tuple[tuple[str, ...], bool]:
    """``--layers`` names -> (module names in forward order, whether ``last4``)."""
    want = []
    last4 = False
    for name in layers:
        if name == STAGES:
            want += list(spec.layer_stages)
        elif name == LAST4:
            last4 = True
        else:
            want.append(name)
    if (want or last4) and not spec.layer_stages and is_timm(spec.name):
        raise FeatxError(f"{spec.name}: timm gives no feature_info layers with "
                         f"forward_intermediates for it, so --layers is not available; "
                         f"extract its penultimate and pools only.")
    if last4 and (spec.layout != "tokens" or spec.num_prefix_tokens == 0
                  if is_timm(spec.name) else True):
        raise ParameterError("layers", LAST4, f"is for ViT-style models (class token and "
                             f"patch tokens); {spec.name} has none. Give stages or module "
                             f"names instead.")
    if last4 and len(spec.layer_stages) < 4:
        raise ParameterError("layers", LAST4, f"needs 4 blocks; {spec.name} has "
                             f"{len(spec.layer_stages)}.")
    known = {name: shape for name, shape, _ in list_layers(spec.name, size)}
    shapes, calls, _ = _probe(spec.name, size)
    for name in want:
        if name in known:
            continue
        if calls.get(name, 0) > 1:
            why = (f"runs {calls[name]} times per forward (a shared module), so its output "
                   f"is ambiguous; name the block that holds it")
        elif name in shapes:
            why = "does not output a spatial map" if calls.get(name) else \
                "is not run on the way to the features"
        else:
            why = "is no module of it"
        raise ParameterError("layers", name, f"{why} ({spec.name}); `featx models --layers "
                             f"{spec.name}` lists the layers, or give {STAGES}.")
    order = list(known)
    return tuple(sorted(dict.fromkeys(want), key=order.index)), last4


def _canonical(spec: BackboneSpec, layer: str, kind: str) -> str:
    """The stored name of ``kind`` of ``layer``: the last map's name when ``layer`` is the
    last map, ``penultimate`` when that equals it."""
    if layer == spec.map_layer:
        layer = ""
    if not layer and kind == spec.penultimate_alias:
        return PENULTIMATE
    if not layer and kind == CLS:  # the last map's class token, not stored as such
        return layer_feature(spec.map_layer, kind)
    return layer_feature(layer, kind)


@functools.lru_cache(maxsize=64)
def layer_plan(model: str, layers: tuple[str, ...] = (), pools: tuple[int, ...] = (1,),
               image_size: int | None = None, keep_map: bool = False) -> LayerPlan:
    """The :class:`LayerPlan` for ``model`` with ``layers`` (module names, ``stages``,
    ``last4``) and ``pools``, at ``image_size`` [default: the model's] pixels. ``keep_map``
    adds the spatial maps themselves, flattened: ``LAYER.map`` for every layer but the
    last map's own (``map``), for ``featx pool`` to pool them later.

    Raises :class:`~featx.errors.ParameterError` naming a layer it cannot read.
    """
    spec = get_backbone(model)
    size = image_size or spec.default_image_size
    pools = tuple(sorted(set(int(p) for p in pools)))
    read, last4 = _resolve(spec, tuple(layers), size) if layers else ((), False)
    layer_pools = pools or (1,)
    if read or last4 or keep_map:
        shapes, _, map_shape = _probe(model, size)
    else:  # no layers: the registry knows every width, and a re-run stays instant
        shapes, map_shape = {}, (1, spec.spatial_channels)
    # a class token to store: ViT-style models with prefix tokens (not e.g. SigLIP's)
    tokens = is_timm(model) and spec.layout == "tokens" and spec.num_prefix_tokens > 0
    requested: list[tuple[str, str, str]] = [(PENULTIMATE, "", PENULTIMATE)]
    requested += [(feature_name(n), "", feature_name(n)) for n in pools]
    for layer in read:
        if tokens:
            requested.append((layer_feature(layer, CLS), layer, CLS))
        requested += [(layer_feature(layer, feature_name(n)), layer, feature_name(n))
                      for n in layer_pools]
    if last4:
        requested.append((LAST4, "", LAST4))
    if keep_map:
        requested += [(layer_feature(layer, MAP), layer, MAP) for layer in read
                      if layer != spec.map_layer] + [(MAP, "", MAP)]
    names, sources, aliases, dims = [], {}, {}, {}
    for name, layer, kind in requested:
        stored = name if kind in (PENULTIMATE, LAST4, MAP) else _canonical(spec, layer, kind)
        if stored != name:
            aliases[name] = stored
        if stored in sources:
            continue
        src_layer, src_kind = ("", stored) if stored in (PENULTIMATE, LAST4, MAP) \
            else layer_of(stored)
        names.append(stored)
        sources[stored] = (src_layer, src_kind)
        channels = map_shape[1] if not src_layer else shapes[src_layer][1]
        if src_kind == PENULTIMATE:
            dims[stored] = spec.penultimate_dim
        elif src_kind == CLS:
            dims[stored] = channels
        elif src_kind == LAST4:
            dims[stored] = 5 * shapes[spec.layer_stages[-1]][1]
        elif src_kind == MAP:
            dims[stored] = int(np.prod((map_shape if not src_layer else shapes[src_layer])[1:]))
        else:
            dims[stored] = channels * pool_of(src_kind) ** 2
    # the last map's (h, w) is known here only when probed; else from the first forward
    map_hw = {"": tuple(map_shape[-2:])} if len(map_shape) == 4 else {}
    map_hw.update({layer: tuple(shapes[layer][-2:]) for layer in read})
    return LayerPlan(model, read, pools, layer_pools, last4, tuple(names), sources, aliases,
                     dims, map_hw)


def layer_notes(plan: LayerPlan, crop: int) -> list[str]:
    """A note naming the layers whose map is smaller than a pool size asked of them (the
    pooled feature then repeats the map's values, as :func:`~featx.backbones.pool_notes` says
    for the last map)."""
    big = max(plan.layer_pools)
    spec = get_backbone(plan.model)
    # the last map's own note is pool_notes'
    small = [f"{layer} ({h}x{w})" for layer, (h, w) in plan.map_hw.items()
             if layer and layer != spec.map_layer and min(h, w) < big]
    if not plan.layers or not small:
        return []
    return [f"note: pool{big} is larger than the map of {', '.join(small)} at {crop} px: "
            f"those features repeat the map's values. A larger --image-size gives larger maps."]
