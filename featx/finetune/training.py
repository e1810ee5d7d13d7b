"""One epoch of fine-tuning, as torchvision's reference script has it: :func:`train_one_epoch`,
:func:`evaluate` and :func:`load_data`, plus the joins that make every process of a
torchrun see the numbers a single process would."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from featx import distributed
from featx.data.images import ImageFiles, TransformSpec
from featx.runtime import autocast

if TYPE_CHECKING:
    from featx.finetune.data import FinetuneData

__all__ = ["evaluate", "load_data", "train_one_epoch"]


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


def join_train_stats(stats: dict) -> dict:
    """:func:`train_one_epoch`'s numbers over every process's shard (images/s summed)."""
    if not distributed.dist_env().distributed:
        return stats
    parts = distributed.all_gather_object(stats)
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


def join_eval_stats(local: dict) -> dict:
    """:func:`evaluate`'s numbers on this process's shard, joined with every other process's.

    The shards split the images by index without padding, so the joined arrays hold each
    image once, in dataset order, as a single process computes them; every process gets the
    same numbers (``loss`` summed in rank order), hence the same checkpoint decisions.
    """
    if not distributed.dist_env().distributed:
        return local
    keys = ("y_true", "scores", "index", "n", "loss", "seconds")
    gathered = distributed.all_gather_object({k: local[k] for k in keys})
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
