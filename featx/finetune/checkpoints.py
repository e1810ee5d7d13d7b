"""A fine-tuning run's files: checkpoints written atomically, RNG state, per-epoch seeding,
resume and history.csv.

A checkpoint is a dict with fixed keys (model, optimizer, scheduler, scaler, epoch, config,
rng, best, history, ...); ``best.pt`` leaves the optimizer, scheduler and scaler out.
Everything here is :func:`featx.finetune.finetune`'s, hence the private names.
"""
from __future__ import annotations

import csv
import errno
import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from featx.errors import DiskFullError, FeatxError, ParameterError, is_disk_full
from featx.files import atomic_write

if TYPE_CHECKING:
    from featx.config import FinetuneConfig
    from featx.finetune.data import FinetuneData

__all__: list[str] = []

# Settings that do not change what a run computes: they stay out of the run's folder name
# and may differ on --resume.
# settings that do not change what is trained (bootstrap: only the test intervals)
RUN_INDEPENDENT = ("resume", "progress", "workers", "device", "out_dir", "bootstrap")


def config_dict(cfg: FinetuneConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


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


def save_checkpoint(obj: dict, path: Path) -> None:
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


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": list(random.getstate())}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_epoch(seed: int, epoch: int, generator: torch.Generator, rank: int = 0) -> int:
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


def write_history(history: list[dict], path: Path) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, _HISTORY_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in _HISTORY_COLUMNS})


def load_resume(path: Path, cfg: FinetuneConfig, data: FinetuneData) -> dict:
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
    old = {k: v for k, v in ckpt["config"].items() if k not in RUN_INDEPENDENT}
    new = {k: v for k, v in config_dict(cfg).items() if k not in RUN_INDEPENDENT}
    diffs = [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if ckpt.get("split_fingerprint") != data.info["split_fingerprint"]:
        diffs.append("the split's file lists differ")
    if diffs:
        raise ParameterError("resume", True, f"{path} was made with other settings "
                             f"({'; '.join(diffs)}); run without {{resume}} to start afresh.",
                             shown="")
    return ckpt
