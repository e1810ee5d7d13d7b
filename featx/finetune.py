"""Fine-tuning: a backbone with a new ``Linear`` head, trained on the heads' very split.

The module reads top to bottom like torchvision's ``references/classification/train.py``:
the model wrapper and the losses, then :func:`train_one_epoch`, :func:`evaluate`,
:func:`load_data`, and :func:`finetune`, the short main. Settings travel in a
:class:`FinetuneConfig`, never in the CLI's argument object.

What a run decides and why:

* The checkpoint that is scored is the one with the lowest **validation loss** (the
  training criterion, so weighted / focal when chosen); early stopping watches the same
  number. Loss rather than accuracy because on the small val splits featx is made for,
  accuracy moves in coarse steps and ties often. The test split is only read once, at the
  end, by that checkpoint. Without a val split the last epoch is used and the result says so.
* Every epoch starts from RNG state seeded by ``(seed, epoch)`` (shuffling generator, torch,
  numpy, random), so the batch order and the augmentation of an epoch do not depend on the
  history, and ``resume`` ends where an uninterrupted run ends.
* Checkpoints (``best.pt``, ``last.pt``) are written to a temporary file and renamed, best
  before last, so an interrupted run always leaves a complete previous best behind.
* Under ``torchrun`` (see :mod:`featx.ddp`) the model is wrapped in DistributedDataParallel:
  ``batch_size`` is per process (global batch = ``batch_size x world size``, as in
  torchvision's reference script) and ``lr`` is used as given. Each process trains on its
  shard of the train split; val and test are split by index without padding and the
  predictions of all processes are gathered, so every image is scored exactly once and every
  process takes the same checkpoint decision. Only rank 0 prints and writes files.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import random
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

import featx
from featx import ddp
from featx.backbones import BackboneSpec, ResolvedWeights, build_backbone, get_backbone
from featx.config import LOSSES, OPTIMIZERS, SCHEDULERS, FinetuneConfig
from featx.data import DataError, DatasetSpec, check_seed, dataset_fingerprints
from featx.errors import DiskFullError, FeatxError, ParameterError, is_disk_full
from featx.extract import pool_notes
from featx.files import atomic_write
from featx.images import ImageFiles, TransformSpec
from featx.metrics import classification_metrics
from featx.results import finetune_result_path, make_result, write_json
from featx.runtime import autocast, cap_workers, finetune_workers, setup

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULERS",
    "FinetuneConfig",
    "FinetuneData",
    "FinetuneModel",
    "FinetuneResult",
    "FocalLoss",
    "build_model",
    "check_config",
    "data_from_cache",
    "data_from_spec",
    "evaluate",
    "finetune",
    "list_stages",
    "load_data",
    "make_loss",
    "run_dir_name",
    "train_one_epoch",
]

# Settings that do not change what a run computes: they stay out of the run's folder name
# and may differ on --resume.
_RUN_INDEPENDENT = ("resume", "progress", "workers", "device", "out_dir")


@dataclass
class FinetuneData:
    """The images one run trains, validates and scores on.

    ``splits`` holds the readable files only, ``{split: [(relpath, label), ...]}`` relative to
    ``root``; ``info`` is the ``dataset`` record of the result (same fingerprints as
    :meth:`featx.cache.Cache.dataset_info` for the same files); ``skipped`` lists
    ``(split, relpath, reason)`` of files left out because they cannot be decoded;
    ``source`` says where the split came from (``--data PATH`` or ``--split-from CACHE``),
    ``cache`` is that cache file, if any.
    """

    name: str
    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    info: dict
    source: str
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    cache: Path | None = None


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: where its files are and the result record it wrote."""

    run_dir: Path
    result_path: Path
    result: dict
    history: list[dict]
    best_epoch: int
    stopped_early: bool
    resumed: bool
    notes: list[str] = field(default_factory=list)


# --- the data ---------------------------------------------------------------------------------

def data_from_cache(path: str | Path, *, allow_missing: bool = False) -> FinetuneData:
    """The exact train/val/test files a cache was extracted from (its readable rows).

    Files of the cache that are no longer in place are refused, naming them; with
    ``allow_missing`` the run goes on without them and its result records the fingerprints
    of the files it really used, so ``report`` lists it as not comparable.
    """
    from featx.cache import Cache
    cache = Cache(path)
    root = Path(cache.attrs["dataset_root"])
    if not root.is_dir():
        raise DataError(f"--split-from {path}: the images it was extracted from were in {root}, "
                        f"which no longer exists. Put them back there, or use {{data_path}} with "
                        f"their new location (same files give the same split).")
    splits = {s: cache.split_items(s) for s in cache.splits}
    info = cache.dataset_info()
    missing = [f"{s}/{rel}" for s, items in splits.items() for rel, _ in items
               if not (root / rel).is_file()]
    if missing and not allow_missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise DataError(f"--split-from {path}: {len(missing)} of its images are no longer in "
                        f"{root} ({shown}). Put them back, re-extract, or pass {{allow_missing}} "
                        f"to fine-tune without them (the result is then not comparable).")
    if missing:
        splits = {s: [(rel, lab) for rel, lab in items if (root / rel).is_file()]
                  for s, items in splits.items()}
        info = {**info, **dataset_fingerprints(splits), "missing_files": len(missing)}
    return FinetuneData(info["name"], root, cache.classes, splits, info, f"--split-from {path}",
                        cache.skipped(), Path(path))


def _no_transform(img):
    return torch.zeros(3, 1, 1)  # decoding is the check; the pixels are not needed


def _decode_errors(root: Path, items: list[tuple[str, int]], workers: int) -> list[str]:
    ds = ImageFiles(root, items, _no_transform, crop=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers)
    errors = [""] * len(items)
    for _, _, idx, errs in loader:
        for i, e in zip(idx.tolist(), errs):
            errors[i] = e
    return errors


def data_from_spec(spec: DatasetSpec, *, workers: int | None = None) -> FinetuneData:
    """``spec``'s split with undecodable files left out, as extraction leaves them out.

    Every file is decoded once up front (``workers`` processes, default one per CPU core up
    to 8), so the fingerprints of the result equal those of a cache extracted from the same
    data, and training never meets a bad file.
    """
    workers = cap_workers(finetune_workers() if workers is None else workers)[0]
    readable, skipped = {}, []
    for split, items in spec.splits.items():
        errors = _decode_errors(spec.root, items, workers)
        readable[split] = [it for it, e in zip(items, errors) if not e]
        skipped += [(split, it[0], e) for it, e in zip(items, errors) if e]
    info = {"name": spec.name, "root": str(Path(spec.root).resolve()),
            "classes": list(spec.classes), "fingerprint": spec.fingerprint(),
            **dataset_fingerprints(readable)}
    return FinetuneData(spec.name, Path(spec.root), list(spec.classes), readable, info,
                        f"--data {spec.root}", skipped)


# --- the model and the losses -----------------------------------------------------------------

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
    raise ParameterError("loss", kind, f"use one of {', '.join(LOSSES)}.")


def _make_optimizer(model: FinetuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
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


def _make_scheduler(optimizer, cfg: FinetuneConfig):
    """Stepped once per epoch: cosine reaches zero after the last epoch; step: x0.1 at each
    third of the run."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.epochs // 3),
                                               gamma=0.1)
    return None


# --- one epoch --------------------------------------------------------------------------------

def _batch_to(images, labels, errors, device):
    ok = torch.tensor([e == "" for e in errors], dtype=torch.bool)
    if not bool(ok.all()):  # a file that became unreadable during the run
        images, labels = images[ok], labels[ok]
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader, device: torch.device, precision: str, scaler, *,
                    desc: str = "train", progress: bool = True) -> dict:
    """One pass over ``loader``; returns mean ``loss``, ``acc``, ``n`` and ``images_per_s``."""
    model.train()
    total_loss, correct, n = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not progress,
               dynamic_ncols=True)
    for images, labels, _, errors in bar:
        images, labels = _batch_to(images, labels, errors, device)
        if len(labels) == 0:
            continue
        with autocast(device, precision):
            logits = model(images)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        n += len(labels)
        bar.set_postfix(loss=f"{total_loss / n:.4f}",
                        img_s=f"{n / max(time.perf_counter() - t0, 1e-9):.0f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return {"loss": total_loss / max(n, 1), "acc": correct / max(n, 1), "n": n,
            "images_per_s": n / seconds if seconds > 0 else 0.0}


def _join_train_stats(stats: dict) -> dict:
    """:func:`train_one_epoch`'s numbers over every process's shard (images/s summed)."""
    if not ddp.current().distributed:
        return stats
    parts = ddp.all_gather_object(stats)
    n = sum(p["n"] for p in parts)
    return {"loss": sum(p["loss"] * p["n"] for p in parts) / max(n, 1),
            "acc": sum(p["acc"] * p["n"] for p in parts) / max(n, 1), "n": n,
            "images_per_s": sum(p["images_per_s"] for p in parts)}


def evaluate(model: nn.Module, criterion: nn.Module, loader, device: torch.device,
             precision: str) -> dict:
    """Mean ``loss`` and ``acc`` over ``loader``, with ``y_true``, ``y_pred``, softmax
    ``scores`` ``(n, n_classes)`` and each row's ``index`` in the dataset as numpy arrays,
    and the wall ``seconds``."""
    model.eval()
    t0 = time.perf_counter()
    total_loss, ys, scores, index = 0.0, [], [], []
    with torch.inference_mode():
        for images, labels, idx, errors in loader:
            index.append(idx[torch.tensor([e == "" for e in errors], dtype=torch.bool)])
            images, labels = _batch_to(images, labels, errors, device)
            if len(labels) == 0:
                continue
            with autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            total_loss += criterion(logits, labels).item() * len(labels)
            ys.append(labels.cpu())
            scores.append(logits.softmax(1).cpu())
    y_true = torch.cat(ys).numpy() if ys else np.zeros(0, dtype=np.int64)
    score = torch.cat(scores).numpy() if scores else np.zeros((0, 0), dtype=np.float32)
    y_pred = score.argmax(1) if len(y_true) else np.zeros(0, dtype=np.int64)
    n = len(y_true)
    return {"loss": total_loss / n if n else float("nan"),
            "acc": float((y_pred == y_true).mean()) if n else float("nan"), "n": n,
            "y_true": y_true, "y_pred": y_pred, "scores": score,
            "index": torch.cat(index).numpy() if index else np.zeros(0, dtype=np.int64),
            "seconds": time.perf_counter() - t0}


def _evaluate_all(model: nn.Module, criterion: nn.Module, loader, device: torch.device,
                  precision: str) -> dict:
    """:func:`evaluate` on this process's shard, joined with every other process's shard.

    The shards split the images by index without padding, so the joined arrays hold each
    image once, in dataset order, as a single process computes them; every process gets the
    same numbers (``loss`` summed in rank order), hence the same checkpoint decisions.
    """
    local = evaluate(model, criterion, loader, device, precision)
    if not ddp.current().distributed:
        return local
    keys = ("y_true", "scores", "index", "n", "loss", "seconds")
    gathered = ddp.all_gather_object({k: local[k] for k in keys})
    seconds = max(p["seconds"] for p in gathered)
    parts = [p for p in gathered if p["n"]]
    n = sum(p["n"] for p in parts)
    if not n:
        return {**local, "seconds": seconds}
    order = np.argsort(np.concatenate([p["index"] for p in parts]), kind="stable")
    y_true = np.concatenate([p["y_true"] for p in parts])[order]
    score = np.concatenate([p["scores"] for p in parts])[order]
    y_pred = score.argmax(1)
    return {"loss": sum(p["loss"] * p["n"] for p in parts) / n,
            "acc": float((y_pred == y_true).mean()), "n": n, "y_true": y_true,
            "y_pred": y_pred, "scores": score,
            "index": np.concatenate([p["index"] for p in parts])[order], "seconds": seconds}


def load_data(data: FinetuneData, transform: TransformSpec, *, batch_size: int, workers: int,
              augment: bool, device: torch.device, generator: torch.Generator,
              rank: int = 0, world_size: int = 1) -> dict:
    """DataLoaders per split for process ``rank`` of ``world_size`` (``0`` of ``1`` alone).

    train: a ``DistributedSampler`` shard (padded to equal size, as DDP needs), reshuffled
    each epoch by ``loader.sampler.set_epoch(seed)``, augmented when ``augment``; ``generator``
    seeds the worker processes. val and test: the eval transform, images ``rank``,
    ``rank + world_size``, ... in file order, no padding (see :func:`_evaluate_all`).
    Batch ``k`` of every rank together are images ``k·B·W .. (k+1)·B·W`` of the epoch's
    permutation, which is the single process's batch ``k`` at batch size ``B·W``.
    """
    loaders = {}
    for split, items in data.splits.items():
        if not items:
            continue
        train = split == "train"
        tf = transform.train_transform() if train and augment else transform.eval_transform()
        ds = ImageFiles(data.root, items, tf, transform.crop)
        sampler, n_local = None, len(items)
        if train:
            # seed 0 here: set_epoch passes the whole (seed, epoch) seed in every epoch
            sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world_size,
                                                          rank=rank, shuffle=True, seed=0)
            n_local = len(sampler)
        elif world_size > 1:
            ds = torch.utils.data.Subset(ds, range(rank, len(items), world_size))
        loaders[split] = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, sampler=sampler,
            generator=generator if train else None, num_workers=workers,
            pin_memory=device.type == "cuda",
            # BatchNorm cannot train on a last batch of one image
            drop_last=train and n_local % batch_size == 1 and n_local > batch_size,
            # fresh workers each epoch: their seeds then come from this epoch's generator
            persistent_workers=False)
    return loaders


# --- checkpoints and files --------------------------------------------------------------------

def _config_dict(cfg: FinetuneConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def run_dir_name(data: FinetuneData, cfg: FinetuneConfig, weights: ResolvedWeights) -> str:
    """``{dataset}_{model}_finetune_{weights}-{freeze}-{loss}-pool{n}-{hash}``.

    The hash covers every setting that changes the outcome, the weights and the split, so
    the same command always finds the same folder (for ``--resume``) and different settings
    never share one.
    """
    key = {k: v for k, v in _config_dict(cfg).items() if k not in _RUN_INDEPENDENT}
    key.update(weights_sha256=weights.sha256, split=data.info["split_fingerprint"])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in data.name)
    return (f"{safe}_{cfg.model.replace(':', '-')}_finetune_{weights.tag}-{cfg.freeze}-{cfg.loss}-pool{cfg.pool}"
            f"-{digest}")


class _WriteErrors:
    """A file for ``torch.save`` that remembers the first ``OSError`` of a write."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_atomic(obj: dict, path: Path) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            out = _WriteErrors(f)
            try:
                torch.save(obj, out)
            except (RuntimeError, OSError) as exc:
                # torch's zip writer reports a failed write as "unexpected pos ..."; the
                # OSError underneath (ENOSPC, EIO) is the one that says what happened
                exc = out.error or exc
                if is_disk_full(exc):
                    raise DiskFullError(
                        errno.ENOSPC, f"the disk is full: writing {path} failed. The "
                        f"checkpoints of the finished epochs and earlier results are kept; "
                        f"free some space and add --resume to the same command to "
                        f"continue.") from None
                raise exc from None


def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": list(random.getstate())}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _seed_epoch(seed: int, epoch: int, generator: torch.Generator, rank: int = 0) -> int:
    """Seed everything random in an epoch from (seed, epoch) alone; return the shuffle's seed.

    Under torchrun the other ranks add their rank, so they augment their images differently;
    the returned seed of the train permutation is the same on every rank.
    """
    s = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    local = s if rank == 0 else int(np.random.SeedSequence([seed, epoch, rank])
                                    .generate_state(1)[0])
    generator.manual_seed(local)
    torch.manual_seed(local)
    np.random.seed(local)
    random.seed(local)
    return s


_HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_s")


def _write_history(history: list[dict], path: Path) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, _HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in _HISTORY_COLUMNS})


def check_config(cfg: FinetuneConfig) -> None:
    """Raise :class:`~featx.errors.ParameterError` naming the first setting of ``cfg`` that
    cannot work."""
    checks = [  # (ok, the field, what is wrong)
        (isinstance(cfg.epochs, int) and cfg.epochs >= 1, "epochs", "must be at least 1."),
        (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, "batch_size",
         "must be at least 1."),
        (math.isfinite(cfg.lr) and cfg.lr > 0, "lr", "must be a positive number, e.g. 1e-3."),
        (math.isfinite(cfg.backbone_lr_mult) and cfg.backbone_lr_mult >= 0, "backbone_lr_mult",
         "must be 0 or more (0 keeps the backbone's weights fixed but its BatchNorm "
         "statistics still adapt)."),
        (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0, "weight_decay",
         "must be 0 or more."),
        (math.isfinite(cfg.focal_gamma) and cfg.focal_gamma >= 0, "focal_gamma",
         "must be 0 or more (0 is cross-entropy)."),
        (1 <= cfg.pool <= 64, "pool", "must be an integer 1..64."),
        (cfg.early_stop >= 0, "early_stop",
         "give a patience in epochs (at least 1), or 0 to train all epochs."),
        (cfg.optimizer in OPTIMIZERS, "optimizer", f"use one of {', '.join(OPTIMIZERS)}."),
        (cfg.scheduler in SCHEDULERS, "scheduler", f"use one of {', '.join(SCHEDULERS)}."),
        (cfg.loss in LOSSES, "loss", f"use one of {', '.join(LOSSES)}."),
        (cfg.workers is None or cfg.workers >= 0, "workers", "must be 0 or more."),
    ]
    for ok, param, problem in checks:
        if not ok:
            raise ParameterError(param, getattr(cfg, param), problem)
    check_seed(cfg.seed)
    stages = list_stages(cfg.model)
    if cfg.freeze not in stages:
        raise ParameterError("freeze", cfg.freeze, f"is not a stage of {cfg.model}; use "
                             f"{', '.join(stages)} (`featx finetune --model {cfg.model} "
                             f"--list-stages`).", sep=" ")


def _check_data(data: FinetuneData, cfg: FinetuneConfig) -> None:
    train = data.splits.get("train", [])
    if not train:
        raise DataError(f"{data.root}: no readable images in the train split.")
    if len({lab for _, lab in train}) < 2:
        raise DataError(f"{data.root}: the train split holds a single class; fine-tuning a "
                        f"classifier needs at least two.")
    if cfg.early_stop and not data.splits.get("val"):
        raise ParameterError("early_stop", cfg.early_stop, f"needs a val split, and "
                             f"{data.source} has none; drop {{early_stop}} or give the data a "
                             f"val split (e.g. {{split_fractions}} 0.7,0.15,0.15).", sep=" ")


def _load_resume(path: Path, cfg: FinetuneConfig, data: FinetuneData) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("config"), dict):
            raise FeatxError("not a featx checkpoint")
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else \
            type(exc).__name__
        raise ParameterError("resume", True, f"{path} cannot be read ({reason}); it is "
                             f"damaged. Run the same command without {{resume}} to start this "
                             f"run afresh.", shown="") from None
    old = {k: v for k, v in ckpt["config"].items() if k not in _RUN_INDEPENDENT}
    new = {k: v for k, v in _config_dict(cfg).items() if k not in _RUN_INDEPENDENT}
    diffs = [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if ckpt.get("split_fingerprint") != data.info["split_fingerprint"]:
        diffs.append("the split's file lists differ")
    if diffs:
        raise ParameterError("resume", True, f"{path} was made with other settings "
                             f"({'; '.join(diffs)}); run without {{resume}} to start afresh.",
                             shown="")
    return ckpt


# --- the run ----------------------------------------------------------------------------------

def finetune(data: FinetuneData, cfg: FinetuneConfig, *,
             log: Callable[[str], None] | None = None,
             on_epoch_end: Callable[[int, dict], None] | None = None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``data``; write checkpoints, history, curves and result.json.

    ``log`` receives one-line progress notes; ``on_epoch_end(epoch, row)`` is called after
    each epoch's checkpoints are on disk (a hook for tests and callers that watch a run).
    Returns a :class:`FinetuneResult`; the result record's metrics are those of the best
    checkpoint on the test split.

    Under torchrun every process calls this with the same arguments; it joins the process
    group (:func:`featx.ddp.setup`), trains with DistributedDataParallel, and only rank 0
    logs and writes files. Every process returns the same result.
    """
    t_start = time.perf_counter()
    notes: list[str] = []
    env = ddp.setup(cfg.device)

    def say(message: str) -> None:
        notes.append(message)
        if log is not None and env.is_main:
            log(message)

    check_config(cfg)
    _check_data(data, cfg)
    ready = setup(cfg.model, cfg.weights, device=cfg.device, precision=cfg.precision,
                  image_size=cfg.image_size, seed=cfg.seed, env=env)
    device, precision, weights, transform = (ready.device, ready.precision, ready.weights,
                                             ready.transform)
    workers, note = cap_workers(finetune_workers() if cfg.workers is None else cfg.workers)
    if note:
        say(note)
    run_dir = Path(cfg.out_dir) / run_dir_name(data, cfg, weights)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    has_val = bool(data.splits.get("val"))

    model = build_model(cfg.model, weights, len(data.classes), pool=cfg.pool,
                        freeze=cfg.freeze, seed=cfg.seed, image_size=transform.crop).to(device)
    if device.type == "cuda" and model.spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.pool > 1:  # one 1-image probe for the map size, in eval mode: BatchNorm untouched
        with torch.inference_mode():
            probe = torch.zeros(1, 3, transform.crop, transform.crop, device=device)
            hw = tuple(model.eval().spec.features(model.backbone, probe).shape[-2:])
        for note in pool_notes(hw, transform.crop, (cfg.pool,), cfg.model):
            say(note)
    counts = np.bincount([lab for _, lab in data.splits["train"]], minlength=len(data.classes))
    criterion = make_loss(cfg.loss, class_counts=counts, gamma=cfg.focal_gamma).to(device)
    optimizer = _make_optimizer(model, cfg)
    scheduler = _make_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator()
    loaders = load_data(data, transform, batch_size=cfg.batch_size, workers=workers,
                        augment=cfg.augment, device=device, generator=generator,
                        rank=env.rank, world_size=env.world_size)

    history: list[dict] = []
    best = {"epoch": None, "val_loss": None, "val_acc": None}
    start_epoch, stopped, resumed = 1, False, False
    # rank 0 reads it and hands it on: only rank 0 needs to see the output folder
    ckpt = ddp.run_on_main(lambda: _load_resume(last_path, cfg, data)
                           if cfg.resume and last_path.is_file() else None)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        history, best, stopped = ckpt["history"], ckpt["best"], ckpt["stopped_early"]
        start_epoch, resumed = ckpt["epoch"] + 1, True
        say(f"resuming {run_dir} after epoch {ckpt['epoch']}")
        was = ckpt.get("world_size", 1)
        if was != env.world_size:
            say(f"the checkpoint was made by {was} process(es), this run has "
                f"{env.world_size}: the global batch changes from {cfg.batch_size * was} to "
                f"{cfg.batch_size * env.world_size}")
    elif cfg.resume:
        say(f"--resume: no last.pt in {run_dir}; starting afresh")
    if not has_val:
        say("no val split: the last epoch's model is scored, and there is no early stopping")

    def checkpoint(epoch: int) -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict(), "epoch": epoch, "config": _config_dict(cfg),
                "rng": _rng_state(), "best": dict(best), "history": list(history),
                "stopped_early": stopped, "classes": list(data.classes),
                "split_fingerprint": data.info["split_fingerprint"],
                "world_size": env.world_size, "featx_version": featx.__version__}

    net: nn.Module = model
    if env.distributed:
        # pool > 1 bypasses the model's own head (e.g. VGG's classifier Linears): DDP must
        # then not wait for their gradients
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.pool > 1)

    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped:
            break
        loaders["train"].sampler.set_epoch(_seed_epoch(cfg.seed, epoch, generator, env.rank))
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(net, criterion, optimizer, loaders["train"], device, precision,
                             scaler, desc=f"epoch {epoch}/{cfg.epochs}",
                             progress=cfg.progress and env.is_main)
        tr = _join_train_stats(tr)
        ddp.broadcast_module(model)  # one model (rank 0's BatchNorm statistics) to evaluate
        va = _evaluate_all(model, criterion, loaders["val"], device, precision) if has_val \
            else None
        if scheduler is not None:
            scheduler.step()
        row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
               "val_loss": va["loss"] if va else None, "val_acc": va["acc"] if va else None,
               "lr": lr, "epoch_s": round(time.perf_counter() - t0, 4)}
        history.append(row)
        improved = (best["epoch"] is None or not has_val
                    or (not math.isnan(va["loss"])
                        and (math.isnan(best["val_loss"]) or va["loss"] < best["val_loss"])))
        if improved:
            best = {"epoch": epoch, "val_loss": row["val_loss"], "val_acc": row["val_acc"]}
        if has_val and cfg.early_stop and epoch - best["epoch"] >= cfg.early_stop \
                and epoch < cfg.epochs:
            stopped = True
        # the same inputs give every rank the same decision; rank 0's is made binding so a
        # disagreement can never leave ranks waiting at different barriers
        improved, best, stopped = ddp.broadcast_object((improved, best, stopped))
        if env.is_main:
            state = checkpoint(epoch)
            if improved:  # best before last: last.pt never names a best that is not on disk
                # best.pt is for scoring and use, so it skips the optimizer state (2x the model)
                _save_atomic({**state, "optimizer": None, "scheduler": None, "scaler": None},
                             best_path)
            _save_atomic(state, last_path)
            _write_history(history, run_dir / "history.csv")
        ddp.barrier()
        say(f"epoch {epoch}/{cfg.epochs}: train loss {tr['loss']:.4f} acc {tr['acc']:.3f}"
            + (f", val loss {va['loss']:.4f} acc {va['acc']:.3f}" if va else "")
            + f", {row['epoch_s']:.1f} s ({tr['images_per_s']:.0f} images/s)"
            + (" *" if improved and has_val else ""))
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stopped:
            say(f"early stop after epoch {epoch}: val loss has not improved for "
                f"{cfg.early_stop} epochs (best epoch {best['epoch']})")

    # score the chosen checkpoint, once, on the test split
    model.load_state_dict(ddp.run_on_main(
        lambda: torch.load(best_path, map_location="cpu", weights_only=True)["model"]))
    scored = next(s for s in ("test", "val", "train") if s in loaders)
    if scored != "test":
        say(f"no test split: the metrics are on the {scored} split")
    if scored == "train":  # as val and test are read: eval transform, each image once
        loaders["train"] = load_data(
            replace(data, splits={"scored": data.splits["train"]}), transform,
            batch_size=cfg.batch_size, workers=workers, augment=False, device=device,
            generator=generator, rank=env.rank, world_size=env.world_size)["scored"]
    te = _evaluate_all(model, criterion, loaders[scored], device, precision)
    fit_s = sum(row["epoch_s"] for row in history)
    earlier_s = sum(row["epoch_s"] for row in history[:start_epoch - 1])  # before a resume
    timings = {"total_s": round(time.perf_counter() - t_start + earlier_s, 3),
               "per_epoch_s": round(fit_s / max(len(history), 1), 3), "fit_s": round(fit_s, 3),
               "predict_s": round(te["seconds"], 3),
               "epoch_s": [row["epoch_s"] for row in history]}
    metrics = classification_metrics(te["y_true"], te["y_pred"], te["scores"], data.classes)
    metrics.update(total_s=timings["total_s"], per_epoch_s=timings["per_epoch_s"])
    selection = {"criterion": "val_loss" if has_val else "last_epoch",
                 "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                 "best_val_accuracy": best["val_acc"], "epochs_run": len(history),
                 "stopped_early": stopped, "scored_split": scored, "resumed": resumed,
                 "notes": [n for n in notes if not n.startswith("epoch ")]}
    used = {"workers": workers, "device_used": str(device), "precision_used": precision,
            "image_size_used": transform.crop, "transform": transform.to_dict(),
            "world_size": env.world_size, "global_batch_size": cfg.batch_size * env.world_size,
            "distributed_backend": env.backend}
    result = _result_record(data, cfg, model, weights, metrics, timings, selection, used)
    result_path = finetune_result_path(run_dir)
    if env.is_main:
        from featx.plots import plot_training_curves
        plot_training_curves(history, run_dir / "curves.png",
                             title=f"{cfg.model} on {data.name} ({run_dir.name})")
        write_json(result_path, result)
    ddp.barrier()
    return FinetuneResult(run_dir, result_path, result, history, best["epoch"], stopped,
                          resumed, notes)


def _result_record(data: FinetuneData, cfg: FinetuneConfig, model: FinetuneModel,
                   weights: ResolvedWeights, metrics: dict, timings: dict, selection: dict,
                   used: dict) -> dict:
    """The run as one record of the shared result schema (artifacts relative to its folder)."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    settings = {**_config_dict(cfg), **used, "split_source": data.source,
                "trainable_params": n_train, "frozen_params": n_all - n_train}
    provenance = {"featx_version": featx.__version__, "torch_version": torch.__version__,
                  "host": socket.gethostname(), "weights_kind": weights.kind,
                  "weights_source": weights.source, "weights_sha256": weights.sha256,
                  "skipped_files": len(data.skipped)}
    artifacts = {"model": "best.pt", "last": "last.pt", "history": "history.csv",
                 "curves": "curves.png"}
    if data.cache is not None:
        artifacts["cache"] = str(data.cache)
    from featx.cache import PENULTIMATE, feature_name
    return make_result(kind="finetune",
                       method=f"finetune freeze={cfg.freeze} loss={cfg.loss} pool={cfg.pool}",
                       dataset=data.info, model=cfg.model, metrics=metrics, timings=timings,
                       settings=settings, selection=selection,
                       feature=PENULTIMATE if cfg.pool == 1 else feature_name(cfg.pool),
                       head="linear", provenance=provenance, artifacts=artifacts)
