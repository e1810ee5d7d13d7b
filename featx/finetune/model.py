"""What a fine-tuning run trains: a backbone with a new ``Linear`` head, frozen up to a stage,
its loss, optimizer and learning-rate schedule."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featx.backbones import BackboneSpec, ResolvedWeights, build_backbone, get_backbone
from featx.config import FinetuneConfig
from featx.errors import ParameterError

if TYPE_CHECKING:
    from featx.config import FinetuneConfig

__all__ = ["FinetuneModel", "FocalLoss", "build_model", "list_stages", "make_loss"]

def list_stages(name: str) -> list[str]:
    """The values ``--freeze`` accepts for model ``name``: none, backbone, then its stages."""
    return ["none", "backbone", *get_backbone(name).stages]


class FinetuneModel(nn.Module):
    """A backbone whose final ``Linear`` is replaced by a new one.

    ``pool=1``: the new ``head`` reads the model's own penultimate (``spec.head``: e.g. ResNet
    avgpool + flatten, VGG ``classifier[:-1]``, timm's ``forward_head(pre_logits=True)``),
    ``penultimate_dim`` inputs. ``pool=N``: it reads ``AdaptiveAvgPool2d(N)`` of the last
    spatial map (a ViT's patch tokens on their grid), flattened channel-major,
    ``spatial_channels·N·N`` inputs. The old classifier becomes ``Identity`` (timm:
    ``reset_classifier(0)``).

    Input ``(B, 3, H, W)`` normalised images; output logits ``(B, num_classes)``.
    """

    def __init__(self, spec: BackboneSpec, backbone: nn.Module, num_classes: int, *,
                 pool: int = 1):
        super().__init__()
        self.spec = spec
        self.pool = pool
        spec.drop_classifier(backbone)
        self.backbone = backbone
        self.pool_layer = nn.AdaptiveAvgPool2d(pool) if pool > 1 else None
        in_features = spec.penultimate_dim if pool == 1 else spec.spatial_channels * pool * pool
        self.head = nn.Linear(in_features, num_classes)
        self.frozen: tuple[str, ...] = ()
        self._frozen_params: frozenset[str] = frozenset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
                freeze: str = "none", seed: int = 0,
                image_size: int | None = None) -> FinetuneModel:
    """Build ``name`` with ``weights``, put a new head for ``num_classes`` on it, freeze.

    The new head is initialised from ``seed``, whatever the global RNG state.
    """
    spec = get_backbone(name)
    backbone = build_backbone(name, weights, seed=seed, image_size=image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FinetuneModel(spec, backbone, num_classes, pool=pool)
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
