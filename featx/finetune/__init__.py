"""Fine-tuning on the same split and metrics as the heads.

Read in this order: :mod:`~featx.finetune.data` (the images of each split, from a cache's
file list or a dataset), :mod:`~featx.finetune.model` (the backbone with a new head, losses,
optimizers, schedules), :mod:`~featx.finetune.training` (one epoch, evaluation, loaders),
:mod:`~featx.finetune.checkpoints` (save, resume, history) and :mod:`~featx.finetune.run`
(the loop from top to bottom, and the result).
"""
from featx.config import FinetuneConfig
from featx.finetune.data import (
    FinetuneData,
    data_from_cache,
    data_from_spec,
    repeat_sources,
    subset_data,
)
from featx.finetune.model import (
    FinetuneModel,
    FocalLoss,
    build_model,
    cut_stages,
    list_stages,
    make_loss,
)
from featx.finetune.run import FinetuneResult, check_config, finetune, run_dir_name
from featx.finetune.training import evaluate, load_data, train_one_epoch

__all__ = ["FinetuneConfig", "FinetuneData", "FinetuneModel", "FinetuneResult", "FocalLoss",
           "build_model", "check_config", "cut_stages", "data_from_cache", "data_from_spec", "evaluate",
           "finetune", "list_stages", "load_data", "make_loss", "repeat_sources",
           "run_dir_name", "subset_data", "train_one_epoch"]
