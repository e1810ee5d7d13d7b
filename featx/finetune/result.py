"""What a fine-tuning run is and what it records: its identity (the settings that name its
folder and that ``--resume`` compares), its cost (parameters and forward FLOPs, so a
``--cut`` network's row shows what it saves) and its record in the shared result schema."""
from __future__ import annotations

import socket
import torch
import torch.nn as nn

import featx
from featx.backbones import ResolvedWeights
from featx.config import FinetuneConfig
from featx.finetune.checkpoints import RUN_INDEPENDENT, config_dict
from featx.finetune.data import FinetuneData
from featx.finetune.model import FinetuneModel
from featx.results import make_result, repeat_record

__all__ = ["forward_cost", "result_record", "run_identity"]


def run_identity(cfg: FinetuneConfig) -> dict:
    """The settings that make a run what it is (its folder's hash, what resume compares).
    ``cut`` only when set: a run of the whole network keeps the folder it had before
    ``--cut`` existed."""
    key = {k: v for k, v in config_dict(cfg).items() if k not in RUN_INDEPENDENT}
    if key.get("cut") is None:
        key.pop("cut", None)
    return key


def result_record(data: FinetuneData, cfg: FinetuneConfig, model: FinetuneModel,
                   weights: ResolvedWeights, metrics: dict, timings: dict, selection: dict,
                   used: dict) -> dict:
    """The run as one record of the shared result schema (artifacts relative to its folder)."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    settings = {**config_dict(cfg), **used, "split_source": data.source,
                "trainable_params": n_train, "frozen_params": n_all - n_train}
    provenance = {"featx_version": featx.__version__, "torch_version": torch.__version__,
                  "host": socket.gethostname(), "weights_kind": weights.kind,
                  "weights_source": weights.source, "weights_sha256": weights.sha256,
                  "skipped_files": len(data.skipped)}
    artifacts = {"model": "best.pt", "last": "last.pt", "history": "history.csv",
                 "curves": "curves.png"}
    if data.cache is not None:
        artifacts["cache"] = str(data.cache)
    from featx.features import PENULTIMATE, feature_name, layer_feature
    at = "" if cfg.cut is None else f" @ {cfg.cut}"
    method = f"finetune{at} freeze={cfg.freeze} loss={cfg.loss} pool={cfg.pool}"
    subset = data.info.get("train_subset")
    # the same experiment on another split or seed: every setting but those and the run's
    experiment = {k: v for k, v in run_identity(cfg).items() if k != "seed"}
    # random init (weights none) is seeded: its hash changes with the seed, not the experiment
    experiment.update(kind="finetune", method=method,
                      weights_sha256=weights.sha256 if weights.kind != "none" else "none",
                      train_subset=None if subset is None else
                      {k: subset[k] for k in ("shots", "fraction", "draw")})
    if cfg.cut is not None:
        feature = layer_feature(cfg.cut, feature_name(cfg.pool))
    else:
        feature = PENULTIMATE if cfg.pool == 1 else feature_name(cfg.pool)
    return make_result(kind="finetune", method=method,
                       dataset={k: v for k, v in data.info.items() if k != "train_subset"},
                       model=cfg.model, metrics=metrics, timings=timings,
                       settings=settings, selection=selection,
                       feature=feature, head="linear", provenance=provenance, artifacts=artifacts,
                       repeat=repeat_record(experiment, split_seed=data.info.get("split_seed"),
                                            seed=cfg.seed),
                       train_subset=subset, cut=cfg.cut)


def forward_cost(model: nn.Module, crop: int, device: torch.device) -> dict:
    """``{"total_params", "forward_flops"}`` of ``model``: all its parameters, and the FLOPs
    of one ``crop`` px image's forward as torch's ``FlopCounterMode`` counts them (matrix
    multiplies and convolutions, 2 per multiply-add), so a cut network's row shows what it
    costs against the whole one's."""
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(torch.zeros(1, 3, crop, crop, device=device))
    model.train(was)
    return {"total_params": sum(p.numel() for p in model.parameters()),
            "forward_flops": int(counter.get_total_flops())}
