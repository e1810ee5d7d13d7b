"""Fine-tuning: a backbone with a new ``Linear`` head, trained on the heads' very split.

:func:`finetune` is the short main, in the manner of torchvision's
``references/classification/train.py``: it runs named steps top to bottom (prepare, build,
resume, the epochs, score, record). Settings travel in a :class:`FinetuneConfig`
(:mod:`featx.config`), never in the CLI's argument object. The parts live beside it: the
data in :mod:`featx.finetune.data`, the model, losses and optimizers in
:mod:`featx.finetune.model`, one epoch's :func:`train_one_epoch` / :func:`evaluate` /
:func:`load_data` in :mod:`featx.finetune.training`, checkpoints, RNG state and resume in
:mod:`featx.finetune.checkpoints`; :mod:`featx.finetune` exports the public names.

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
* Under ``torchrun`` (see :mod:`featx.distributed`) the model is wrapped in DistributedDataParallel:
  ``batch_size`` is per process (global batch = ``batch_size x world size``, as in
  torchvision's reference script) and ``lr`` is used as given. Each process trains on its
  shard of the train split; val and test are split by index without padding and the
  predictions of all processes are gathered, so every image is scored exactly once and every
  process takes the same checkpoint decision. Only rank 0 prints and writes files.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn as nn

import featx
from featx import distributed
from featx.artifacts import file_sha256, sha256_key
from featx.backbones import ResolvedWeights, is_timm, pool_notes, resolve_run
from featx.config import FinetuneConfig, check_settings
from featx.data import DataError
from featx.data.subsets import TrainSubset
from featx.errors import ParameterError
from featx.finetune.checkpoints import (
    config_dict,
    load_resume,
    rng_state,
    save_checkpoint,
    seed_epoch,
    set_rng_state,
    write_history,
)
from featx.finetune.data import FinetuneData
from featx.finetune.model import (
    FinetuneModel,
    build_model,
    check_cut,
    list_stages,
    make_loss,
    make_optimizer,
    make_scheduler,
)
from featx.finetune.result import forward_cost, result_record, run_identity
from featx.finetune.training import (
    evaluate,
    join_eval_stats,
    join_train_stats,
    load_data,
    train_one_epoch,
)
from featx.results import (
    finetune_result_path,
    image_outputs_path,
    write_image_outputs,
    write_json,
)
from featx.stats import scored_metrics
from featx.runtime import cap_workers, finetune_workers

if TYPE_CHECKING:
    from featx.data.images import TransformSpec

__all__ = ["FinetuneResult", "check_config", "finetune", "run_dir_name"]


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


def check_config(cfg: FinetuneConfig) -> None:
    """Raise :class:`~featx.errors.ParameterError` naming the first setting of ``cfg`` that
    cannot work."""
    check_settings(cfg)  # the rules declared beside its fields (featx/config.py)
    stages = list_stages(cfg.model)
    if cfg.freeze not in stages:
        raise ParameterError("freeze", cfg.freeze, f"is not a stage of {cfg.model}; use "
                             f"{', '.join(stages)} (`featx finetune --model {cfg.model} "
                             f"--list-stages`).", sep=" ")
    check_cut(cfg.model, cfg.cut)


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


def run_dir_name(data: FinetuneData, cfg: FinetuneConfig, weights: ResolvedWeights) -> str:
    """``{dataset}_{model}_finetune_{weights}-{freeze}-{loss}-pool{n}[-at-{cut}]-{hash}``.

    The hash covers every setting that changes the outcome, the weights and the split, so
    the same command always finds the same folder (for ``--resume``) and different settings
    never share one.
    """
    key = run_identity(cfg)
    key.update(weights_sha256=weights.sha256, split=data.info["split_fingerprint"])
    subset = data.info.get("train_subset")
    tag = ""
    if subset is not None:  # a labelled train subset (label efficiency): its own folder
        key["train_subset"] = subset["train_fingerprint"]
        tag = "-" + TrainSubset(subset["shots"], subset["fraction"], subset["draw"]).tag
    if cfg.cut is not None:
        tag = f"-at-{cfg.cut}{tag}"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in data.name)
    return (f"{safe}_{cfg.model.replace(':', '-')}_finetune_{weights.tag}-{cfg.freeze}-{cfg.loss}-pool{cfg.pool}"
            f"{tag}-{digest}")


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
    group (:func:`featx.distributed.init_process_group`), trains with DistributedDataParallel, and only rank 0
    logs and writes files. Every process returns the same result.
    """
    run = _Run(data, cfg, log)
    _prepare(run)
    _build(run)
    _resume(run)
    _distribute(run)
    for epoch in range(run.start_epoch, cfg.epochs + 1):
        if run.stopped:
            break
        _epoch(run, epoch, on_epoch_end)
    scored, test = _score(run)
    return _record(run, scored, test)


@dataclass(eq=False)
class _Run:
    """What the steps of one :func:`finetune` share; each step fills in its part."""

    data: FinetuneData
    cfg: FinetuneConfig
    log: Callable[[str], None] | None
    t_start: float = field(default_factory=time.perf_counter)
    notes: list[str] = field(default_factory=list)
    # the epochs so far (from last.pt on --resume)
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "val_loss": None,
                                                "val_acc": None})
    start_epoch: int = 1
    stopped: bool = False
    resumed: bool = False
    # set by _prepare
    env: distributed.DistEnv = field(init=False)
    device: torch.device = field(init=False)
    precision: str = field(init=False)
    weights: ResolvedWeights = field(init=False)
    transform: TransformSpec = field(init=False)
    workers: int = field(init=False)
    run_dir: Path = field(init=False)
    # set by _build and _distribute
    model: FinetuneModel = field(init=False)
    net: nn.Module = field(init=False)  # what trains: the model, or its DDP wrapper
    criterion: nn.Module = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)
    generator: torch.Generator = field(init=False)
    loaders: dict = field(init=False)
    cost: dict = field(init=False)

    def say(self, message: str) -> None:
        self.notes.append(message)
        if self.log is not None and self.env.is_main:
            self.log(message)

    @property
    def has_val(self) -> bool:
        return bool(self.data.splits.get("val"))

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"


def _prepare(run: _Run) -> None:
    """Join the process group, check the settings and the data, resolve device, precision,
    weights and transform, cap the workers, make the run's folder."""
    cfg, data = run.cfg, run.data
    run.env = distributed.init_process_group(cfg.device)
    check_config(cfg)
    _check_data(data, cfg)
    ready = resolve_run(cfg.model, cfg.weights, device=cfg.device, precision=cfg.precision,
                        image_size=cfg.image_size, seed=cfg.seed, env=run.env,
                        frozen=False)  # training: mixed precision as before (docs/engines.md)
    run.device, run.precision, run.weights, run.transform = (ready.device, ready.precision,
                                                             ready.weights, ready.transform)
    run.workers, note = cap_workers(finetune_workers() if cfg.workers is None else cfg.workers)
    if note:
        run.say(note)
    run.run_dir = Path(cfg.out_dir) / run_dir_name(data, cfg, run.weights)
    if run.env.is_main:
        run.run_dir.mkdir(parents=True, exist_ok=True)


def _build(run: _Run) -> None:
    """The model (a 1-image probe says what ``pool`` makes of its map), the loss, optimizer,
    schedule, gradient scaler, and the loaders."""
    cfg, data, device, crop = run.cfg, run.data, run.device, run.transform.crop
    model = build_model(cfg.model, run.weights, len(data.classes), pool=cfg.pool,
                        freeze=cfg.freeze, seed=cfg.seed, image_size=crop,
                        cut=cfg.cut).to(device)
    if device.type == "cuda" and model.spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.pool > 1:  # one 1-image probe for the map size, in eval mode: BatchNorm untouched
        with torch.inference_mode():
            probe = torch.zeros(1, 3, crop, crop, device=device)
            hw = tuple(model.eval().spatial_map(probe).shape[-2:])
        for note in pool_notes(hw, crop, (cfg.pool,), cfg.model):
            run.say(note)
    run.cost = forward_cost(model, crop, device)
    counts = np.bincount([lab for _, lab in data.splits["train"]], minlength=len(data.classes))
    run.model = model
    run.criterion = make_loss(cfg.loss, class_counts=counts, gamma=cfg.focal_gamma).to(device)
    run.optimizer = make_optimizer(model, cfg)
    run.scheduler = make_scheduler(run.optimizer, cfg)
    run.scaler = torch.amp.GradScaler(device.type, enabled=run.precision == "fp16")
    run.generator = torch.Generator()
    run.loaders = _loaders(run, data, augment=cfg.augment)


def _loaders(run: _Run, data: FinetuneData, *, augment: bool) -> dict:
    return load_data(data, run.transform, batch_size=run.cfg.batch_size, workers=run.workers,
                     augment=augment, device=run.device, generator=run.generator,
                     rank=run.env.rank, world_size=run.env.world_size)


def _resume(run: _Run) -> None:
    """With ``resume`` and a last.pt: its weights, optimizer, schedule, RNG and history."""
    cfg, env = run.cfg, run.env
    # rank 0 reads it and hands it on: only rank 0 needs to see the output folder
    ckpt = distributed.run_on_main(lambda: load_resume(run.last_path, cfg, run.data)
                           if cfg.resume and run.last_path.is_file() else None)
    if ckpt is not None:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if run.scheduler is not None:
            run.scheduler.load_state_dict(ckpt["scheduler"])
        run.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        run.history, run.best, run.stopped = ckpt["history"], ckpt["best"], ckpt["stopped_early"]
        run.start_epoch, run.resumed = ckpt["epoch"] + 1, True
        run.say(f"resuming {run.run_dir} after epoch {ckpt['epoch']}")
        was = ckpt.get("world_size", 1)
        if was != env.world_size:
            run.say(f"the checkpoint was made by {was} process(es), this run has "
                    f"{env.world_size}: the global batch changes from {cfg.batch_size * was} "
                    f"to {cfg.batch_size * env.world_size}")
    elif cfg.resume:
        run.say(f"--resume: no last.pt in {run.run_dir}; starting afresh")


def _distribute(run: _Run) -> None:
    """Under torchrun, wrap the (resumed) model in DistributedDataParallel."""
    if not run.has_val:  # said here, after the resume notes, as the result lists them
        run.say("no val split: the last epoch's model is scored, and there is no early stopping")
    run.net = run.model
    if run.env.distributed:
        # pool > 1 bypasses the model's own head (e.g. VGG's classifier Linears): DDP must
        # then not wait for their gradients (a cut torchvision network has none: they are
        # dropped; timm's pruning keeps the final norm, which a ViT's cut may not use)
        run.net = nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None,
            find_unused_parameters=(run.cfg.pool > 1 and run.cfg.cut is None)
            or (run.cfg.cut is not None and is_timm(run.cfg.model)))


def _epoch(run: _Run, epoch: int, on_epoch_end: Callable[[int, dict], None] | None) -> None:
    """One epoch: train, validate, select, checkpoint, then say so."""
    cfg = run.cfg
    tr, va, row = _train_and_validate(run, epoch)
    improved = _select(run, epoch, row)
    _checkpoint(run, epoch, improved)
    run.say(f"epoch {epoch}/{cfg.epochs}: train loss {tr['loss']:.4f} acc {tr['acc']:.3f}"
            + (f", val loss {va['loss']:.4f} acc {va['acc']:.3f}" if va else "")
            + f", {row['epoch_s']:.1f} s ({tr['images_per_s']:.0f} images/s)"
            + (" *" if improved and run.has_val else ""))
    if on_epoch_end is not None:
        on_epoch_end(epoch, row)
    if run.stopped:
        run.say(f"early stop after epoch {epoch}: val loss has not improved for "
                f"{cfg.early_stop} epochs (best epoch {run.best['epoch']})")


def _train_and_validate(run: _Run, epoch: int) -> tuple[dict, dict | None, dict]:
    """Train on this process's shard, then validate rank 0's model; append the history row."""
    cfg, env = run.cfg, run.env
    run.loaders["train"].sampler.set_epoch(seed_epoch(cfg.seed, epoch, run.generator,
                                                       env.rank))
    t0 = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    tr = train_one_epoch(run.net, run.criterion, run.optimizer, run.loaders["train"],
                         run.device, run.precision, run.scaler,
                         desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress and env.is_main)
    tr = join_train_stats(tr)
    distributed.broadcast_module(run.model)  # one model (rank 0's BatchNorm statistics) to evaluate
    va = _evaluate_all(run, "val") if run.has_val else None
    if run.scheduler is not None:
        run.scheduler.step()
    row = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"],
           "val_loss": va["loss"] if va else None, "val_acc": va["acc"] if va else None,
           "lr": lr, "epoch_s": round(time.perf_counter() - t0, 4)}
    run.history.append(row)
    return tr, va, row


def _select(run: _Run, epoch: int, row: dict) -> bool:
    """Whether ``epoch`` is the new best (lowest val loss; the latest without val); whether
    early stopping ends the run here. The same on every process."""
    best, has_val, cfg = run.best, run.has_val, run.cfg
    improved = (best["epoch"] is None or not has_val
                or (not math.isnan(row["val_loss"])
                    and (math.isnan(best["val_loss"]) or row["val_loss"] < best["val_loss"])))
    if improved:
        run.best = {"epoch": epoch, "val_loss": row["val_loss"], "val_acc": row["val_acc"]}
    if has_val and cfg.early_stop and epoch - run.best["epoch"] >= cfg.early_stop \
            and epoch < cfg.epochs:
        run.stopped = True
    # the same inputs give every rank the same decision; rank 0's is made binding so a
    # disagreement can never leave ranks waiting at different barriers
    improved, run.best, run.stopped = distributed.broadcast_object((improved, run.best, run.stopped))
    return improved


def _checkpoint(run: _Run, epoch: int, improved: bool) -> None:
    """Rank 0 writes best.pt (when ``improved``), last.pt and history.csv; all ranks wait."""
    if run.env.is_main:
        state = _checkpoint_state(run, epoch)
        if improved:  # best before last: last.pt never names a best that is not on disk
            # best.pt is for scoring and use, so it skips the optimizer state (2x the model)
            save_checkpoint({**state, "optimizer": None, "scheduler": None, "scaler": None},
                         run.best_path)
        save_checkpoint(state, run.last_path)
        write_history(run.history, run.run_dir / "history.csv")
    distributed.barrier()


def _checkpoint_state(run: _Run, epoch: int) -> dict:
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": run.scaler.state_dict(), "epoch": epoch, "config": config_dict(run.cfg),
            "rng": rng_state(), "best": dict(run.best), "history": list(run.history),
            "stopped_early": run.stopped, "classes": list(run.data.classes),
            "split_fingerprint": run.data.info["split_fingerprint"],
            "world_size": run.env.world_size, "featx_version": featx.__version__}


def _evaluate_all(run: _Run, split: str) -> dict:
    """:func:`evaluate` on every process's shard of ``split``, joined (each image once)."""
    return join_eval_stats(evaluate(run.model, run.criterion, run.loaders[split], run.device,
                                     run.precision))


def _score(run: _Run) -> tuple[str, dict]:
    """The chosen checkpoint, once, on the test split (without one: val, else train)."""
    run.model.load_state_dict(distributed.run_on_main(
        lambda: torch.load(run.best_path, map_location="cpu", weights_only=True)["model"]))
    scored = next(s for s in ("test", "val", "train") if s in run.loaders)
    if scored != "test":
        run.say(f"no test split: the metrics are on the {scored} split")
    if scored == "train":  # as val and test are read: eval transform, each image once
        run.loaders["train"] = _loaders(
            run, replace(run.data, splits={"scored": run.data.splits["train"]}),
            augment=False)["scored"]
    return scored, _evaluate_all(run, scored)


def _record(run: _Run, scored: str, te: dict) -> FinetuneResult:
    """The result record (metrics of ``te``, timings, selection, settings used); rank 0
    writes it with the training curves."""
    cfg, env, history, best = run.cfg, run.env, run.history, run.best
    fit_s = sum(row["epoch_s"] for row in history)
    earlier_s = sum(row["epoch_s"] for row in history[:run.start_epoch - 1])  # before a resume
    timings = {"total_s": round(time.perf_counter() - run.t_start + earlier_s, 3),
               "per_epoch_s": round(fit_s / max(len(history), 1), 3), "fit_s": round(fit_s, 3),
               "predict_s": round(te["seconds"], 3),
               "epoch_s": [row["epoch_s"] for row in history]}
    # the softmax of a model trained on a log loss is its probability (calibrated or not)
    metrics = scored_metrics(te["y_true"], te["y_pred"], te["scores"], run.data.classes,
                             probabilities=True, n_boot=cfg.bootstrap, seed=cfg.seed)
    metrics.update(total_s=timings["total_s"], per_epoch_s=timings["per_epoch_s"])
    selection = {"criterion": "val_loss" if run.has_val else "last_epoch",
                 "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                 "best_val_accuracy": best["val_acc"], "epochs_run": len(history),
                 "stopped_early": run.stopped, "scored_split": scored, "resumed": run.resumed,
                 "notes": [n for n in run.notes if not n.startswith("epoch ")]}
    used = {"workers": run.workers, "device_used": str(run.device),
            "precision_used": run.precision, "image_size_used": run.transform.crop,
            "transform": run.transform.to_dict(), "world_size": env.world_size,
            "global_batch_size": cfg.batch_size * env.world_size,
            "distributed_backend": env.backend}
    result = result_record(run.data, cfg, run.model, run.weights, metrics, timings, selection,
                            {**used, **run.cost})
    result_path = finetune_result_path(run.run_dir)
    if env.is_main:
        from featx.plots import plot_training_curves
        plot_training_curves(history, run.run_dir / "curves.png",
                             title=f"{cfg.model} on {run.data.name} ({run.run_dir.name})")
        # predict and export refuse a best.pt other than the one scored here
        result["artifacts"][sha256_key("model")] = file_sha256(run.best_path)
        result_path.unlink(missing_ok=True)  # never a result beside outputs it did not score
        items = run.data.splits["train" if scored == "train" else scored]
        outputs = write_image_outputs(
            image_outputs_path(result_path), [items[i][0] for i in te["index"]],
            te["y_true"], te["y_pred"], te["scores"], run.data.classes)
        result["artifacts"]["test_outputs"] = outputs.name
        result["artifacts"][sha256_key("test_outputs")] = file_sha256(outputs)
        write_json(result_path, result)
    distributed.barrier()
    return FinetuneResult(run.run_dir, result_path, result, history, best["epoch"],
                          run.stopped, run.resumed, run.notes)
