"""What a fine-tuning run trains: a backbone with a new ``Linear`` head, frozen up to a stage,
its loss, optimizer and learning-rate schedule."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featx.backbones import (BackboneSpec, ResolvedWeights, build_backbone, get_backbone, is_timm,
                             list_layers)
from featx.config import FinetuneConfig
from featx.errors import ParameterError

if TYPE_CHECKING:
    from featx.config import FinetuneConfig

__all__ = ["FinetuneModel", "FocalLoss", "build_model", "check_cut", "cut_stages",
           "list_stages", "make_loss", "truncate"]

# the name the truncated network's one output node gets
_CUT_NODE = "map"


def list_stages(name: str) -> list[str]:
    """The values ``--freeze`` accepts for model ``name``: none, backbone, then its stages."""
    return ["none", "backbone", *get_backbone(name).stages]


def cut_stages(name: str) -> list[str]:
    """The values ``--cut`` accepts for model ``name``: its stage outputs
    (``spec.layer_stages``, the modules ``extract --layers stages`` reads), in forward order."""
    return list(get_backbone(name).layer_stages)


def check_cut(name: str, cut: str | None) -> None:
    """Raise :class:`~featx.errors.ParameterError` when model ``name`` cannot be cut at ``cut``."""
    if cut is None:
        return
    stages = cut_stages(name)
    if not stages:
        raise ParameterError("cut", cut, f"is not available for {name}: timm gives no "
                             f"feature_info stages for it; fine-tune it whole.", sep=" ")
    if cut not in stages:
        raise ParameterError("cut", cut, f"is not a stage of {name}; use {', '.join(stages)} "
                             f"(`featx finetune --model {name} --list-stages`).", sep=" ")


def truncate(backbone: nn.Module, cut: str, spec: BackboneSpec | None = None) -> nn.Module:
    """``backbone`` up to and including module ``cut``, and nothing after it.

    timm models (``spec`` a ``timm:`` entry): timm's own ``prune_intermediate_layers`` drops
    the blocks after the cut and the head, in place (the final norm stays: the cut output is
    read as ``forward_intermediates(norm=True)``, the very feature ``extract --layers``
    stores), and the model itself is returned.

    torchvision's ``create_feature_extractor`` traces the model and keeps only the graph
    nodes the output ``cut`` depends on; the ``GraphModule`` it returns copies only the
    submodules those nodes call, so the later stages and the old classifier are gone (their
    parameters and their compute: the cost of the truncated network is its real cost).
    Parameter names stay the model's own (``layer1.0.conv1.weight``), so freezing by stage
    and checkpoints read as for the whole model. Output: ``{"map": (B, C, h, w)}``.
    """
    if spec is not None and is_timm(spec.name):
        backbone.prune_intermediate_layers(indices=[spec.layer_stages.index(cut)],
                                           prune_norm=False, prune_head=True)
        return backbone
    from torchvision.models.feature_extraction import create_feature_extractor
    return create_feature_extractor(backbone, return_nodes={cut: _CUT_NODE})


class FinetuneModel(nn.Module):
    """A backbone whose final ``Linear`` is replaced by a new one.

    ``pool=1``: the new ``head`` reads the model's own penultimate (``spec.head``: e.g. ResNet
    avgpool + flatten, VGG ``classifier[:-1]``, timm's ``forward_head(pre_logits=True)``),
    ``penultimate_dim`` inputs. ``pool=N``: it reads ``AdaptiveAvgPool2d(N)`` of the last
    spatial map (a ViT's patch tokens on their grid), flattened channel-major,
    ``spatial_channels·N·N`` inputs. The old classifier becomes ``Identity`` (timm:
    ``reset_classifier(0)``).

    ``cut=LAYER`` (a stage, :func:`cut_stages`): the backbone is truncated (:func:`truncate`) after
    that module, and the head reads ``AdaptiveAvgPool2d(pool)`` of its output, flattened,
    ``C_cut·pool·pool`` inputs. Cut at a model's last map with ``pool=1`` and a global-average
    head (ResNet: ``layer4``) it is the whole model's fine-tuning: the same parameters under
    the same names, the same forward.

    Input ``(B, 3, H, W)`` normalised images; output logits ``(B, num_classes)``.
    """

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, num_classes: int, *,
                 pool: int = 1, cut: str | None = None):
        super().__init__()
        self.spec = spec
        self.pool = pool
        self.cut = cut
        spec.drop_classifier(backbone)
        if cut is None:
            self.backbone = backbone
            self.pool_layer = nn.AdaptiveAvgPool2d(pool) if pool > 1 else None
            in_features = (spec.penultimate_dim if pool == 1
                           else spec.spatial_channels * pool * pool)
        else:
            check_cut(spec.name, cut)
            # channels do not depend on the image size: the model's own size's probe serves
            channels = {name: shape[0] for name, shape, _ in list_layers(spec.name)}[cut]
            self.backbone = truncate(backbone, cut, spec)
            self._cut_index = spec.layer_stages.index(cut)
            self.pool_layer = nn.AdaptiveAvgPool2d(pool)
            in_features = channels * pool * pool
        self.head = nn.Linear(in_features, num_classes)
        self.frozen: tuple[str, ...] = ()
        self._frozen_params: frozenset[str] = frozenset()

    def spatial_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)``: the map the head's pooling reads (the cut layer's, or the last;
        a ViT's patch tokens on their grid)."""
        if self.cut is not None:
            if is_timm(self.spec.name):
                return self.backbone.forward_intermediates(
                    x, indices=[self._cut_index], norm=True, output_fmt="NCHW",
                    intermediates_only=True)[0]
            return self.backbone(x)[_CUT_NODE]
        return self.spec.spatial(self.backbone, self.spec.features(self.backbone, x), x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cut is not None:
            return self.head(torch.flatten(self.pool_layer(self.spatial_map(x)), 1))
        fmap = self.spec.features(self.backbone, x)
        if self.pool_layer is None:
            z = self.spec.head(self.backbone, fmap)
        else:
            z = torch.flatten(self.pool_layer(self.spec.spatial(self.backbone, fmap, x)), 1)
        return self.head(z)

    def freeze(self, what: str) -> "FinetuneModel":
        """Freeze ``none``, the whole ``backbone``, or the stages up to and including ``what``.

        Frozen parameters get ``requires_grad=False``, and frozen modules (those whose
        parameters are all frozen) stay in eval mode during training so their BatchNorm
        statistics do not move either. A stage is a set of parameters (``spec``), so stages
        that own bare parameters (a ViT's class token and position embedding) freeze too.
        """
        stages = self.spec.stages
        if what == "none":
            self.frozen = ()
        elif what == "backbone":
            self.frozen = ("",)
        elif what in stages:
            self.frozen = stages[:stages.index(what) + 1]
            if self.cut is not None:  # the stages after the cut are gone
                kept = {s for s in stages
                        if self.spec.stage_parameter_names(self.backbone, s)} \
                    if is_timm(self.spec.name) else {n for n, _ in self.backbone.named_modules()}
                if what not in kept:
                    usable = ["none", "backbone", *(s for s in stages if s in kept)]
                    raise ParameterError("freeze", what, f"is cut away by --cut {self.cut}; "
                                         f"use {', '.join(usable)}.", sep=" ")
                self.frozen = tuple(s for s in self.frozen if s in kept)
        else:
            raise ParameterError("freeze", what, f"is not a stage of {self.spec.name}; use "
                                 f"{', '.join(list_stages(self.spec.name))} (see `featx "
                                 f"finetune --model {self.spec.name} --list-stages`).", sep=" ")
        names = {n for stage in self.frozen
                 for n in self.spec.stage_parameter_names(self.backbone, stage)}
        for n, p in self.backbone.named_parameters():
            if n in names:
                p.requires_grad_(False)
        self._frozen_params = frozenset(names)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "FinetuneModel":
        super().train(mode)
        if mode and self._frozen_params:
            for name, module in self.backbone.named_modules():
                own = [n for n, _ in module.named_parameters(prefix=name)]
                if own and all(n in self._frozen_params for n in own):
                    module.eval()
        return self


def build_model(name: str, weights: ResolvedWeights | str, num_classes: int, *, pool: int = 1,
                freeze: str = "none", seed: int = 0, image_size: int | None = None,
                cut: str | None = None) -> FinetuneModel:
    """Build ``name`` with ``weights``, cut it after ``cut`` (``None``: whole), put a new head
    for ``num_classes`` on it, freeze.

    The new head is initialised from ``seed``, whatever the global RNG state.
    """
    spec = get_backbone(name)
    check_cut(name, cut)  # before the weights are loaded
    backbone = build_backbone(name, weights, seed=seed, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FinetuneModel(spec, backbone, num_classes, pool=pool, cut=cut)
    return model.freeze(freeze)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): mean over samples of ``-(1 - p_t)^gamma · log p_t``.

    ``gamma=0`` is cross-entropy. Inputs: logits ``(B, K)``, integer targets ``(B,)``.
    """

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        # the clamp keeps the gradient finite when p_t rounds to exactly 1 and gamma < 1
        factor = (1 - log_pt.exp()).clamp(min=1e-6).pow(self.gamma)
        return -(factor * log_pt).mean()


def make_loss(kind: str, *, class_counts=None, gamma: float = 2.0) -> nn.Module:
    """``ce``; ``weighted``: cross-entropy with weights ``n / (K · n_c)`` from the train class
    counts ``n_c`` (sklearn's "balanced"; ``K`` classes present, absent ones weigh 0);
    ``focal`` with ``gamma``."""
    if kind == "ce":
        return nn.CrossEntropyLoss()
    if kind == "weighted":
        counts = np.asarray(class_counts, dtype=np.float64)
        present = int((counts > 0).sum())
        w = np.where(counts > 0, counts.sum() / (present * np.maximum(counts, 1)), 0.0)
        return nn.CrossEntropyLoss(weight=torch.tensor(w, dtype=torch.float32))
    if kind == "focal":
        return FocalLoss(gamma)
    raise NotImplementedError(f"loss {kind!r} is declared in featx.config but not built here")


def make_optimizer(model: FinetuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    groups = [{"name": "head", "lr": cfg.lr,
               "params": [p for p in model.head.parameters() if p.requires_grad]}]
    body = [p for p in model.backbone.parameters() if p.requires_grad]
    if body:
        groups.append({"name": "backbone", "lr": cfg.lr * cfg.backbone_lr_mult, "params": body})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: FinetuneConfig):
    """Stepped once per epoch: cosine reaches zero after the last epoch; step: x0.1 at each
    third of the run."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.epochs // 3),
                                               gamma=0.1)
    return None
