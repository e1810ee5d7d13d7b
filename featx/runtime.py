"""Where and how a run computes: device, precision, DataLoader workers.

One place for what every command decides before it touches data: the device (``auto``:
CUDA when present), the precision (``auto``: bf16 where it is fast, see
:func:`resolve_precision`) and how many DataLoader workers by default. The torchrun process
and its group are :mod:`featx.distributed`'s; resolving a model's weights and transform is
:func:`featx.backbones.resolve_run`'s.
"""
from __future__ import annotations

import contextlib
import os

import torch

from featx.config import DEFAULT_MAX_WORKERS, ExtractConfig, check_setting
from featx.data import DataParameterError
from featx.errors import Note, ParameterError

__all__ = ["autocast", "cap_workers", "cpu_has_amx", "cpu_has_native_bf16", "extract_workers",
           "finetune_workers", "resolve_device", "resolve_precision"]


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


def resolve_precision(precision: str, device: torch.device, *, bf16_ok: bool = True) -> str:
    """``auto``: bf16 on GPUs that support it, fp16 on older GPUs; on the CPU bf16 where the
    cores compute in bf16 natively (AMX or AVX512-BF16), else fp32. With ``bf16_ok`` false
    (the model's features move beyond the bound in bf16:
    :func:`featx.backbones.bf16_keeps_features`) ``auto`` is fp32 everywhere.

    Native bf16 made CPU extraction 2-3x faster than fp32; emulated bf16 (AVX2, plain
    AVX512) is ~8x slower, so there fp32 stays. bf16 moves ResNet features by ~3e-3
    relative, which did not change a logistic head's test accuracy (BENCHMARKS.md), but
    ImageNet MobileNetV2's by 0.2; ``fp32`` gives torchvision's numbers to 1e-5. The
    resolved precision is recorded in the cache.
    """
    check_setting(ExtractConfig, "precision", precision)
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise ParameterError("precision", precision, "needs a GPU; use fp32 or bf16 on the "
                                 "CPU.", shown=precision, sep=" ")
        return precision
    if not bf16_ok:
        # fp16 has 3 more mantissa bits than bf16 but was not measured: not chosen either
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX512-BF16)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch >= 2.1
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (where torch's bf16 is fastest: BENCHMARKS.md)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


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
