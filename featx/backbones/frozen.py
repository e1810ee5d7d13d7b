"""The frozen model in its fast eval form: a backbone built for the frozen pass (BatchNorm
folded into the convolutions, channels-last, optionally ``torch.compile``-d), and the one
forward the cache's features come from.

Extraction (one process or torchrun's shards, featx/extract/) and
``featx predict`` all build the model here, so new images get the very features the cache
holds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featx.backbones.build import FeatureModel, RunSetup, build_backbone
from featx.backbones.engines import EngineError, engine_runner
from featx.backbones.layers import LayerFeatures, LayerPlan, layer_plan
from featx.backbones.registry import get_backbone
from featx.data.images import TransformSpec
from featx.features import PENULTIMATE, pool_of
from featx.runtime import autocast

__all__ = ["FrozenModel", "check_engine_serves", "compile_model", "feature_dims", "forward_batch",
           "frozen_model", "prepare_for_inference"]


def feature_dims(model: str, pools, layers=(), image_size: int | None = None,
                 keep_map: bool = False) -> dict[str, int]:
    """Width of every stored feature of ``model``: ``penultimate``, ``pool{n}`` per n and each
    layer's features (:func:`~featx.backbones.layers.layer_plan`), identical ones once; with
    ``keep_map`` the flattened maps too."""
    return dict(layer_plan(model, tuple(layers), tuple(pools), image_size, keep_map).dims)


@dataclass
class FrozenModel:
    """A backbone in its eval form on ``device`` (see :func:`frozen_model`), and the one
    forward the cache's features come from (:meth:`features`).

    ``network`` is the :class:`FeatureModel`; ``module`` the
    :class:`~featx.backbones.layers.LayerFeatures` on it that returns every feature of
    ``plan``; ``run`` is that module or its compiled form, which is fed batches padded to
    ``pad_to`` images (one shape, no recompiling), or, with ``engine`` other than torch,
    the exported graph (:func:`~featx.backbones.engines.engine_runner`) wrapped to return the
    same features.
    """

    network: FeatureModel
    transform: TransformSpec
    device: torch.device
    precision: str
    run: Callable
    pad_to: int | None = None
    plan: LayerPlan | None = None
    module: LayerFeatures | None = None
    engine: str = "torch"
    _others: dict = field(default_factory=dict, repr=False)

    def features(self, images: torch.Tensor, pools=None,
                 map_size: dict | None = None) -> dict[str, np.ndarray]:
        """Every stored feature of ``plan`` (``penultimate`` ``(B, D)``, ``pool{n}``
        ``(B, C*n*n)``, layers...) for ``(B, 3, H, W)`` uint8 images, resized and cropped
        (``transform.eval_transform_uint8``), and the plan's aliases of them (``pool1`` for
        ``penultimate`` where they are equal). ``pools`` other than the plan's (predict asks
        for one feature) run an eager module for them on the same network;
        ``map_size["hw"]`` receives the last spatial map's ``(h, w)``."""
        run, plan = self.run, self.plan
        key = tuple(sorted(set(pools))) if pools is not None else plan.pools
        if key != plan.pools:
            if key not in self._others:
                other = layer_plan(plan.model, plan.layers + (("last4",) if plan.last4 else ()),
                                   key, self.transform.crop)
                self._others[key] = LayerFeatures(self.network, other)
            run = self._others[key]
            plan = run.plan
        feats = forward_batch(run, images, self.transform, key, self.device, self.precision,
                              pad_to=self.pad_to if run is self.run else None,
                              # an exported graph takes NCHW: no reordering to undo
                              channels_last=self.network.spec.channels_last
                              and self.engine == "torch", plan=plan)
        if map_size is not None:
            module = self.module if run is self.run else run
            map_size["hw"] = plan.map_hw.get("") or module.last_map_hw
        return feats


def frozen_model(model: str, ready: RunSetup, *, layers=(), pools=(1,), keep_map=False,
                 compile_batch: int | None = None,
                 notes: list[str] | None = None) -> FrozenModel:
    """Build ``model`` with ``ready.weights`` for the frozen pass: on ``ready.device``, eval
    mode, :func:`prepare_for_inference`, wrapped in the
    :class:`~featx.backbones.layers.LayerFeatures` of ``layers`` and ``pools``; with
    ``compile_batch`` also :func:`compile_model` for batches of that many images (a fallback
    to eager mode is said in ``notes``).

    Extraction (one process or torchrun's shards) and ``featx predict`` all build it here,
    so new images get the very features the cache holds. With ``ready.engine`` other than
    torch the forward runs in that engine (its graph exported once, then reused), and
    ``compile_batch`` does not apply (said in ``notes``).
    """
    notes = notes if notes is not None else []
    plan = layer_plan(model, tuple(layers), tuple(pools), ready.transform.crop, keep_map)
    net = build_backbone(model, ready.weights, image_size=ready.transform.crop)
    fm = prepare_for_inference(FeatureModel(get_backbone(model), net.to(ready.device)).eval(),
                               keep=plan.layers)
    if ready.engine != "torch":
        check_engine_serves(ready.engine, layers, keep_map)
        if compile_batch:
            notes.append(f"note: --compile is torch's; {ready.engine} runs its own optimised "
                         f"graph.")
        run = _EngineFeatures(engine_runner(ready.engine, fm, model, ready.weights.sha256,
                                            ready.transform.crop, notes), plan)
        return FrozenModel(fm, ready.transform, ready.device, ready.precision, run, None,
                           plan, run, engine=ready.engine)
    module = LayerFeatures(fm, plan)  # after folding: its hooks sit on the final modules
    run = compile_model(module, notes) if compile_batch else module
    return FrozenModel(fm, ready.transform, ready.device, ready.precision, run, compile_batch,
                       plan, module)


def check_engine_serves(engine: str, layers=(), keep_map: bool = False) -> None:
    """Refuse, in one line, ``layers`` or ``keep_map`` in an exported-graph ``engine``: its graph
    gives the last map and the penultimate only (``auto`` picks torch for them)."""
    if engine not in ("torch", "auto") and (tuple(layers) or keep_map):
        raise EngineError(f"--engine {engine} extracts the penultimate and the last map's pools "
                          f"only: use --engine torch (or auto) for --layers / --keep-map.")


class _EngineFeatures:
    """An engine's ``(last map, penultimate)`` as the features of a last-map-only plan, the
    pools computed here in fp32 as :class:`~featx.backbones.layers.LayerFeatures` does."""

    def __init__(self, run, plan: LayerPlan):
        self.run, self.plan, self.last_map_hw = run, plan, None

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap, pen = self.run(x)
        fmap = fmap.float()
        self.last_map_hw = tuple(int(v) for v in fmap.shape[-2:])
        return {name: pen.float() if kind == PENULTIMATE
                else F.adaptive_avg_pool2d(fmap, pool_of(kind)).flatten(1)
                for name, (_, kind) in self.plan.sources.items()}


def forward_batch(run, images: torch.Tensor, transform: TransformSpec, pools, device,
                  precision, pad_to: int | None = None, channels_last: bool = True,
                  map_size: dict | None = None, plan: LayerPlan | None = None
                  ) -> dict[str, np.ndarray]:
    """Features of one batch of ``(B, 3, H, W)`` uint8 images (resized and cropped), with
    the plan's aliases (``pool1`` where it is ``penultimate``) beside the stored ones.

    ``run`` is a :class:`~featx.backbones.layers.LayerFeatures` (its own plan; ``pools`` is
    then not read), its compiled form (give ``plan``), or a bare :class:`FeatureModel`, for
    which the penultimate and the ``pools`` of its last map are computed.
    ``map_size["hw"]`` receives the last spatial map's ``(h, w)``.
    """
    if isinstance(run, FeatureModel):
        run = LayerFeatures(run, layer_plan(run.spec.name, (), tuple(pools),
                                            int(images.shape[-1])))
    plan = plan if plan is not None else run.plan
    n = len(images)
    if pad_to is not None and n < pad_to:
        # a compiled model is specialised to one batch shape; another would recompile (~10 s)
        images = torch.cat([images, images[-1:].expand(pad_to - n, *images.shape[1:])])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
    with torch.inference_mode(), autocast(device, precision):
        out = run(transform.normalize_batch(x))
    if map_size is not None and isinstance(run, LayerFeatures):
        map_size["hw"] = plan.map_hw.get("") or run.last_map_hw
    feats = {k: v[:n].cpu().numpy() for k, v in out.items()}
    feats.update({alias: feats[stored] for alias, stored in plan.aliases.items()})
    return feats


def compile_model(fm: nn.Module, notes: list[str]):
    """``torch.compile`` with frozen weights: inductor then prepacks the oneDNN conv weights
    and fuses bias/ReLU/residual adds into the convolutions, which eager mode cannot.

    Compiling needs a C++ compiler and can fail on an unusual setup; then the run goes on
    in eager mode (same features) and says so in ``notes``.
    """
    import torch._inductor.config as inductor_config
    compiled = torch.compile(fm, dynamic=False)
    use = {"fn": None}

    def run(x):
        if use["fn"] is fm:
            return fm(x)
        # freezing must be on while inductor compiles (the first call); passing it through
        # torch.compile(options=...) measured no faster than eager, so patch it per call
        try:
            with inductor_config.patch(freezing=True):
                out = compiled(x)
        except Exception as exc:
            if use["fn"] is not None:
                raise  # it compiled and ran before: this is not a compile problem
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"note: torch.compile failed ({type(exc).__name__}: {reason}); "
                         f"extracted without it (same features). --no-compile skips trying.")
            use["fn"] = fm
            return fm(x)
        use["fn"] = compiled
        return out
    return run


def prepare_for_inference(fm: FeatureModel, *, keep=()) -> FeatureModel:
    """Frozen, BatchNorm folded into the convolutions, channels-last: the fast eval form.

    Both are exact up to float rounding (features move by ~1e-7 to 4e-6 relative, inside
    the 1e-5 contract with torchvision, and as close to a float64 forward as torchvision's
    own fp32 is) and together made CPU extraction 1.2x (resnet18), 1.3x (resnet50) and 2.7x
    (mobilenet_v2) faster end to end (BENCHMARKS.md). Channels-last pays on every registered
    model once the BatchNorms are gone, depthwise ones included. timm models: folding only
    finds plain ``Conv2d -> BatchNorm2d`` pairs (timm's fused ``BatchNormAct2d`` and
    LayerNorms stay), and channels-last is for CNNs only (``spec.channels_last``): a ViT's
    tokens have no channel dimension to reorder.

    ``keep``: module names of the backbone (``--layers``) whose own output is read; a conv
    among them keeps its BatchNorm (folded, the conv would output the BatchNorm's result).
    """
    _fold_batchnorm(fm, keep=tuple(f"model.{name}" for name in keep))
    if fm.spec.channels_last:
        fm = fm.to(memory_format=torch.channels_last)
    for p in fm.parameters():
        p.requires_grad_(False)
    return fm


def _fold_batchnorm(fm: FeatureModel, keep=()) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that only reads a ``Conv2d`` into that conv.

    The module tree is edited in place (conv -> conv with folded bias, bn -> Identity), so
    every other module, and any hook on it, stays. Returns how many pairs were folded; a
    model that torch.fx cannot trace is left as it is.
    """
    pairs = [(c, b) for c, b in _conv_bn_pairs(fm) if c not in keep]
    for conv_name, bn_name in pairs:
        conv, bn = fm.get_submodule(conv_name), fm.get_submodule(bn_name)
        for name, module in ((conv_name, fuse_conv_bn_eval(conv, bn)), (bn_name, nn.Identity())):
            parent, _, attr = name.rpartition(".")
            setattr(fm.get_submodule(parent), attr, module)
    return len(pairs)


class _Trunk(nn.Module):
    # The trunk is where the BatchNorms are; heads slice Sequentials, which fx cannot trace.
    def __init__(self, fm: FeatureModel):
        super().__init__()
        self.fm = fm

    def forward(self, x):
        return self.fm.forward_features(x)


def _conv_bn_pairs(fm: FeatureModel) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where the bn's only input is the conv's only output."""
    if not any(type(m) is nn.BatchNorm2d for m in fm.modules()):
        return []  # nothing to fold (ViTs, ConvNeXt): skip the copy and the trace
    probe = copy.deepcopy(fm)
    for m in probe.modules():  # tracing runs hooks; a caller's hooks must not see it
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    if any(m.training for m in probe.modules() if isinstance(m, nn.BatchNorm2d)):
        return []  # folding uses the running statistics, which only eval mode reads
    try:
        gm = torch.fx.symbolic_trace(_Trunk(probe))
    except Exception:  # data-dependent control flow: no folding, still correct
        return []
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and type(modules[src.target]) is nn.Conv2d and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1
                and modules[node.target].running_mean is not None):
            pairs.append((src.target.removeprefix("fm."), node.target.removeprefix("fm.")))
    return pairs
