"""Running under ``torchrun``: the process group, which process is rank 0, sharing results.

featx never starts processes itself: ``torchrun`` (directly, or from ``srun`` on SLURM) starts
one process per GPU (or per CPU slot) and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address. :func:`setup` (:func:`featx.runtime.init_process_group`) joins the process
group those variables describe: NCCL when the run uses CUDA (each process on
``cuda:LOCAL_RANK``), gloo on the CPU. Outside torchrun every function here acts on a world of
one process, so callers keep one code path.

The helpers move small Python objects (pickled) or a module's tensors; none of them reads or
writes files, so only rank 0 needs to see the output folder.
"""
from __future__ import annotations

import pickle
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from featx.runtime import DistEnv, current, init_process_group, local_device, torchrun_env

__all__ = [
    "DistEnv",
    "all_gather_object",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "current",
    "local_device",
    "run_on_main",
    "setup",
    "torchrun_env",
]

T = TypeVar("T")

# the process group itself (joining it, this process's rank) lives in featx/runtime.py
setup = init_process_group


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for outside torchrun)."""
    if current().distributed:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every process (pickled; for small records and states)."""
    if not current().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every process's ``obj``, as a list in rank order (the same list on every process)."""
    env = current()
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its value to every process.

    If ``fn`` raises, every process raises the same exception (so each one exits with the
    same one-line error, rather than the others waiting for rank 0 forever).
    """
    env = current()
    if not env.distributed:
        return fn()
    outcome, error = None, None
    if env.is_main:
        try:
            outcome = ("ok", fn())
        except KeyboardInterrupt:
            raise  # every process gets the signal from torchrun; nobody waits for this one
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
            outcome = ("error", exc if _picklable(exc) else RuntimeError(str(exc)))
    outcome = broadcast_object(outcome)
    if error is not None:
        raise error
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def _picklable(obj) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001 - any pickling failure means "send a copy instead"
        return False


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers (BatchNorm statistics) into ``module``.

    DistributedDataParallel keeps parameters equal, but each process updates its own
    BatchNorm running statistics in its last training step; evaluation needs one model.
    """
    if not current().distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)
