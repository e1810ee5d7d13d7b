"""Where and how a run computes: device, precision, DataLoader workers, the torchrun process.

One place for what every command decides before it touches data: the device (``auto``:
CUDA when present), the precision (``auto``: bf16 where it is fast, see
:func:`resolve_precision`), how many DataLoader workers by default, and, under ``torchrun``,
this process's rank and the process group. :func:`setup` is the step extraction and
fine-tuning share: device -> precision -> weights -> transform.

featx never starts processes itself: ``torchrun`` (directly, or from ``srun`` on SLURM) starts
one process per GPU (or per CPU slot) and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address. :func:`init_process_group` joins the process group those variables
describe: NCCL when the run uses CUDA (each process on ``cuda:LOCAL_RANK``), gloo on the CPU.
Outside torchrun every function here acts on a world of one process, so callers keep one code
path. The collectives (broadcast, gather, rank-0-only work) are in :mod:`featx.ddp`.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from featx.backbones import backbone_transform
from featx.weights import ResolvedWeights, resolve_weights
from featx.config import DEFAULT_MAX_WORKERS, PRECISIONS
from featx.data import DataParameterError
from featx.errors import FeatxError, Note, ParameterError
from featx.images import TransformSpec

__all__ = [
    "DEFAULT_MAX_WORKERS",
    "PRECISIONS",
    "DistEnv",
    "RunSetup",
    "autocast",
    "cap_workers",
    "cpu_has_native_bf16",
    "current",
    "extract_workers",
    "finetune_workers",
    "init_process_group",
    "local_device",
    "resolve_device",
    "resolve_precision",
    "setup",
    "torchrun_env",
]



# Ranks other than 0 wait at a collective while rank 0 alone does file work (compare's
# extraction and heads); torch's default (10 min NCCL, 30 min gloo) would kill a long wait.
# torchrun stops every process when one fails, so a long timeout does not hide a crash.
_TIMEOUT_ENV = "FEATX_DDP_TIMEOUT_S"
_DEFAULT_TIMEOUT_S = 6 * 3600


# -- device and precision -------------------------------------------------------------------

def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ParameterError("device", device, "use auto, cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError("device", device, "no CUDA device is available here; use cpu or "
                             "auto.", shown=device)
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs; on the CPU bf16 where the
    cores compute in bf16 natively (AMX or AVX512-BF16), else fp32.

    Native bf16 made CPU extraction 2-3x faster than fp32; emulated bf16 (AVX2, plain
    AVX512) is ~8x slower, so there fp32 stays. bf16 moves features by ~3e-3 relative,
    which did not change a logistic head's test accuracy (BENCHMARKS.md); ``fp32`` gives
    torchvision's numbers to 1e-5. The resolved precision is recorded in the cache.
    """
    if precision not in PRECISIONS:
        raise ParameterError("precision", precision, f"use one of {', '.join(PRECISIONS)}.")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ParameterError("precision", precision, "needs a GPU; use fp32 or bf16 on the "
                                 "CPU.", shown=precision, sep=" ")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch >= 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# -- DataLoader workers ---------------------------------------------------------------------

def extract_workers(device: torch.device) -> int:
    """Default DataLoader workers of the frozen pass (``--workers`` unset) on ``device``."""
    cores = os.cpu_count() or 1
    if device.type == "cpu":
        # The forward already keeps every core busy; worker processes only steal cycles
        # from it. On 2 cores decoding in the main process measured faster even for
        # 1024x1024 JPEGs (BENCHMARKS.md); bigger CPUs get a few workers (not measured).
        return min(DEFAULT_MAX_WORKERS, cores // 4)
    return min(DEFAULT_MAX_WORKERS, cores)


def finetune_workers() -> int:
    """Default DataLoader workers of fine-tuning and its up-front decode check."""
    # torchrun's processes on one node share its cores
    per_node = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(DEFAULT_MAX_WORKERS, (os.cpu_count() or 1) // per_node))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


def cap_workers(requested: int, param: str = "workers") -> tuple[int, str | None]:
    """``(workers, note)``: ``requested`` DataLoader workers, at most one per usable core.

    More processes than cores only compete for them (and each holds a copy of the dataset
    and a prefetch queue); ``note`` (a :class:`~featx.errors.Note` naming ``param``) says so
    when the number was lowered, else ``None``.
    """
    if requested < 0:
        raise DataParameterError(param, requested, "must be 0 or more (0 decodes in the main "
                                 "process).")
    cores = _usable_cores()
    if requested <= cores:
        return requested, None
    return cores, Note(f"note: {{{param}}} {requested} is more than the {cores} CPU core(s) "
                       f"here; using {cores}.")


# -- the step extraction and fine-tuning share ----------------------------------------------

@dataclass(frozen=True)
class RunSetup:
    """What :func:`setup` resolved: where and in what precision to run, which weights, and
    the transform that goes with them (``transform.crop`` pixels square)."""

    device: torch.device
    precision: str
    weights: ResolvedWeights
    transform: TransformSpec


def setup(model: str, weights: str = "imagenet", *, device: str = "auto",
          precision: str = "auto", image_size: int | None = None, seed: int = 0,
          env: DistEnv | None = None) -> RunSetup:
    """Device -> precision -> weights -> transform for ``model``, in that order (so the first
    bad option is the one reported). Under torchrun (``env`` joined) a CUDA device is this
    process's ``cuda:LOCAL_RANK``. ``seed`` draws random init (``weights="none"``).
    """
    dev = resolve_device(device)
    if env is not None:
        dev = local_device(dev, env)
    prec = resolve_precision(precision, dev)
    resolved = resolve_weights(model, weights, seed=seed)
    return RunSetup(dev, prec, resolved, backbone_transform(model, resolved, image_size))


# -- torchrun: this process and the process group -------------------------------------------

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


def torchrun_env() -> DistEnv | None:
    """``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as torchrun sets them, or ``None`` when absent."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world < 1 or not 0 <= rank < world:
        raise FeatxError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE.")
    return DistEnv(rank, world, local)


def current() -> DistEnv:
    """This process's place in the joined process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistEnv()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def _wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def init_process_group(device: str = "auto") -> DistEnv:
    """Join the process group torchrun describes, once; a no-op outside torchrun.

    ``device`` is the run's ``--device``: with CUDA (``cuda`` or ``auto`` on a GPU machine)
    the backend is NCCL and this process uses ``cuda:LOCAL_RANK``; on the CPU it is gloo.
    The group is left at interpreter exit.
    """
    if dist.is_available() and dist.is_initialized():
        return current()
    env = torchrun_env()
    if env is None:
        return DistEnv()
    if not dist.is_available():
        raise FeatxError("torchrun started featx, but this torch build has no "
                         "torch.distributed; run a single process (python -m featx ...).")
    cuda = _wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise ParameterError("device", device, "no CUDA device is available here; use "
                                 "{device} cpu (gloo) or run where GPUs are.", shown=device)
        if env.local_rank >= torch.cuda.device_count():
            raise FeatxError(f"LOCAL_RANK {env.local_rank} has no GPU: this node sees "
                             f"{torch.cuda.device_count()}; start at most that many processes "
                             f"per node (torchrun --nproc-per-node).")
        torch.cuda.set_device(env.local_rank)
    timeout = float(os.environ.get(_TIMEOUT_ENV, _DEFAULT_TIMEOUT_S))
    join_group("nccl" if cuda else "gloo", timedelta(seconds=timeout))
    return current()


def join_group(backend: str, timeout: timedelta) -> None:
    """``torch.distributed.init_process_group`` (from torchrun's variables), left at exit."""
    dist.init_process_group(backend, timeout=timeout)
    atexit.register(_teardown)


def _teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device, env: DistEnv) -> torch.device:
    """``device`` for this process: under torchrun a CUDA device is ``cuda:LOCAL_RANK``."""
    if env.distributed and device.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return device
