"""The frozen model in its fast eval form: a backbone built for the frozen pass (BatchNorm
folded into the convolutions, channels-last, optionally ``torch.compile``-d), and the one
forward the cache's features come from.

Extraction (one process or torchrun's shards, featx/extract/) and
``featx predict`` all build the model here, so new images get the very features the cache
holds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from featx.backbones.build import FeatureModel, RunSetup, build_backbone
from featx.backbones.engines import engine_runner
from featx.backbones.registry import get_backbone
from featx.data.images import TransformSpec
from featx.features import PENULTIMATE, feature_name
from featx.runtime import autocast

__all__ = ["FrozenModel", "compile_model", "feature_dims", "forward_batch", "frozen_model",
           "prepare_for_inference"]


def feature_dims(model: str, pools) -> dict[str, int]:
    """Width of every cached feature of ``model``: ``penultimate`` and ``pool{n}`` per n."""
    spec = get_backbone(model)
    dims = {PENULTIMATE: spec.penultimate_dim}
    dims.update({feature_name(n): spec.spatial_channels * n * n for n in pools})
    return dims


@dataclass
class FrozenModel:
    """A backbone in its eval form on ``device`` (see :func:`frozen_model`), and the one
    forward the cache's features come from (:meth:`features`).

    ``network`` is the :class:`FeatureModel`; ``run`` is it, its compiled form (fed
    batches padded to ``pad_to`` images: one shape, no recompiling) or its exported graph in
    ``engine`` (:func:`~featx.backbones.engines.engine_runner`).
    """

    network: FeatureModel
    transform: TransformSpec
    device: torch.device
    precision: str
    run: Callable
    pad_to: int | None = None
    engine: str = "torch"

    def features(self, images: torch.Tensor, pools,
                 map_size: dict | None = None) -> dict[str, np.ndarray]:
        """``penultimate`` ``(B, D)`` and ``pool{n}`` ``(B, C*n*n)`` per n of ``pools`` for
        ``(B, 3, H, W)`` uint8 images, resized and cropped (``transform.eval_transform_uint8``)."""
        return forward_batch(self.run, images, self.transform, pools, self.device,
                             self.precision, pad_to=self.pad_to,
                             # an exported graph takes NCHW: no reordering to undo
                             channels_last=self.network.spec.channels_last
                             and self.engine == "torch", map_size=map_size)


def frozen_model(model: str, ready: RunSetup, *, compile_batch: int | None = None,
                 notes: list[str] | None = None) -> FrozenModel:
    """Build ``model`` with ``ready.weights`` for the frozen pass: on ``ready.device``, eval
    mode, :func:`prepare_for_inference`; with ``compile_batch`` also :func:`compile_model`
    for batches of that many images (a fallback to eager mode is said in ``notes``).

    Extraction (one process or torchrun's shards) and ``featx predict`` all build it here,
    so new images get the very features the cache holds. With ``ready.engine`` other than
    torch the forward runs in that engine (its graph exported once, then reused), and
    ``compile_batch`` does not apply (said in ``notes``).
    """
    notes = notes if notes is not None else []
    net = build_backbone(model, ready.weights, image_size=ready.transform.crop)
    fm = prepare_for_inference(FeatureModel(get_backbone(model), net.to(ready.device)).eval())
    if ready.engine != "torch":
        if compile_batch:
            notes.append(f"note: --compile is torch's; {ready.engine} runs its own optimised "
                         f"graph.")
        run = engine_runner(ready.engine, fm, model, ready.weights.sha256,
                            ready.transform.crop, notes)
        return FrozenModel(fm, ready.transform, ready.device, ready.precision, run,
                           engine=ready.engine)
    run = compile_model(fm, notes) if compile_batch else fm
    return FrozenModel(fm, ready.transform, ready.device, ready.precision, run, compile_batch)


def forward_batch(fm, images: torch.Tensor, transform: TransformSpec, pools, device, precision,
             pad_to: int | None = None, channels_last: bool = True,
             map_size: dict | None = None) -> dict[str, np.ndarray]:
    """Features of one batch of ``(B, 3, H, W)`` uint8 images (resized and cropped);
    ``map_size["hw"]`` receives the last spatial map's ``(h, w)``."""
    n = len(images)
    if pad_to is not None and n < pad_to:
        # a compiled model is specialised to one batch shape; another would recompile (~10 s)
        images = torch.cat([images, images[-1:].expand(pad_to - n, *images.shape[1:])])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
    with torch.inference_mode(), autocast(device, precision):
        x = transform.normalize_batch(x)
        fmap, pen = fm(x)
        # pools in fp32: averaging many bf16 values loses precision for no speed gain
        fmap = fmap[:n].float()
        if map_size is not None:
            map_size["hw"] = tuple(fmap.shape[-2:])
        out = {"penultimate": pen[:n].float()}
        for p in pools:
            out[feature_name(p)] = F.adaptive_avg_pool2d(fmap, p).flatten(1)
    return {k: v.cpu().numpy() for k, v in out.items()}


def compile_model(fm: FeatureModel, notes: list[str]):
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


def prepare_for_inference(fm: FeatureModel) -> FeatureModel:
    """Frozen, BatchNorm folded into the convolutions, channels-last: the fast eval form.

    Both are exact up to float rounding (features move by ~1e-7 to 4e-6 relative, inside
    the 1e-5 contract with torchvision, and as close to a float64 forward as torchvision's
    own fp32 is) and together made CPU extraction 1.2x (resnet18), 1.3x (resnet50) and 2.7x
    (mobilenet_v2) faster end to end (BENCHMARKS.md). Channels-last pays on every registered
    model once the BatchNorms are gone, depthwise ones included. timm models: folding only
    finds plain ``Conv2d -> BatchNorm2d`` pairs (timm's fused ``BatchNormAct2d`` and
    LayerNorms stay), and channels-last is for CNNs only (``spec.channels_last``): a ViT's
    tokens have no channel dimension to reorder.
    """
    _fold_batchnorm(fm)
    if fm.spec.channels_last:
        fm = fm.to(memory_format=torch.channels_last)
    for p in fm.parameters():
        p.requires_grad_(False)
    return fm


def _fold_batchnorm(fm: FeatureModel) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that only reads a ``Conv2d`` into that conv.

    The module tree is edited in place (conv -> conv with folded bias, bn -> Identity), so
    every other module, and any hook on it, stays. Returns how many pairs were folded; a
    model that torch.fx cannot trace is left as it is.
    """
    pairs = _conv_bn_pairs(fm)
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
