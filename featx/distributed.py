"""torchrun: this process's rank, the process group, and the collectives featx uses.

featx never starts processes itself: ``torchrun`` (directly, or from ``srun`` on SLURM) starts
one process per GPU (or per CPU slot) and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address. :func:`dist_env` is the one reader of those; :func:`init_process_group`
the one join (NCCL when the run uses CUDA, each process on ``cuda:LOCAL_RANK``; gloo on the
CPU), with one timeout. Outside torchrun every function here acts on a world of one process,
so callers keep one code path.
"""
from __future__ import annotations

import atexit
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from featx.errors import FeatxError, ParameterError

__all__ = ["DistEnv", "all_gather_object", "barrier", "broadcast_module", "broadcast_object",
           "dist_env", "init_process_group", "is_main_process", "launched_by_torchrun",
           "local_device", "run_on_main"]

T = TypeVar("T")

# Ranks other than 0 wait at a collective while rank 0 alone does file work (compare's
# extraction and heads, the join of extraction shards, which copies every row): both can
# take hours on big image sets, far beyond torch's default (10 min NCCL, 30 min gloo).
# torchrun stops every process when one fails, so a long timeout does not hide a crash.
_TIMEOUT_ENV = "FEATX_DDP_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 24 * 3600



@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node.

    ``backend`` is ``"gloo"`` or ``"nccl"`` when a process group is joined, else ``None``
    (a plain ``python -m featx`` run: rank 0 of 1).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True inside a joined process group (even of one process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise FeatxError(f"{name}={raw!r}: torchrun sets it to an integer; start featx with "
                         f"torchrun, or unset it for a single process.") from None


def launched_by_torchrun() -> bool:
    """Whether torchrun (or srun, or a user) set ``RANK`` and ``WORLD_SIZE`` for this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def dist_env() -> DistEnv:
    """This process's place in the job: the one reader of rank and world size.

    Inside a joined process group, the group's own rank, size and backend; otherwise
    ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun sets them (not yet joined:
    ``backend`` is ``None``); a plain run is rank 0 of 1.
    """
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistEnv(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))
    if not launched_by_torchrun():
        return DistEnv()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world < 1 or not 0 <= rank < world:
        raise FeatxError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE (the "
                         f"rank must be 0..{world - 1}); torchrun sets them so, or unset them "
                         f"to run a single process.")
    return DistEnv(rank, world, local)


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true outside ``torchrun``)."""
    return dist_env().rank == 0


def _wants_cuda(device: str | torch.device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_process_group(device: str | torch.device = "auto") -> DistEnv:
    """Join the process group torchrun describes, once; a no-op outside torchrun.

    ``device`` is the run's ``--device``: with CUDA (``cuda`` or ``auto`` on a GPU machine)
    the backend is NCCL and this process uses ``cuda:LOCAL_RANK``; on the CPU it is gloo.
    The group is left at interpreter exit.
    """
    env = dist_env()
    if env.distributed or not launched_by_torchrun():
        return env
    if not dist.is_available():
        raise FeatxError("torchrun started featx, but this torch build has no "
                         "torch.distributed; run a single process (python -m featx ...).")
    cuda = _wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise ParameterError("device", device, "no CUDA device is available here; use "
                                 "{device} cpu (gloo) or run where GPUs are.", shown=str(device))
        if env.local_rank >= torch.cuda.device_count():
            raise FeatxError(f"LOCAL_RANK {env.local_rank} has no GPU: this node sees "
                             f"{torch.cuda.device_count()}; start at most that many processes "
                             f"per node (torchrun --nproc-per-node).")
        torch.cuda.set_device(env.local_rank)
    timeout = timedelta(seconds=float(os.environ.get(_TIMEOUT_ENV, _DEFAULT_TIMEOUT_S)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    atexit.register(_teardown)
    return dist_env()


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, env: DistEnv) -> torch.device:
    """``device`` for this process: under torchrun a CUDA device is ``cuda:LOCAL_RANK``."""
    if env.distributed and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for outside torchrun)."""
    if dist_env().distributed:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every process (pickled; for small records and states)."""
    if not dist_env().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    """Every process's ``obj``, as a list in rank order (the same list on every process)."""
    env = dist_env()
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
    env = dist_env()
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
    if not dist_env().distributed:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=src)
