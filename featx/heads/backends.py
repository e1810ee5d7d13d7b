"""Where the fits run: joblib on loky processes (default), a dask cluster or a ray cluster."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator

import joblib

from featx.config import BACKENDS, HeadsConfig, check_setting
from featx.errors import ParameterError

__all__ = ["BACKENDS", "check_backend", "heads_backend"]


_OPEN_BACKENDS: list[tuple[str, str | None]] = []  # heads_backend contexts open in this process


def _die_with_parent(parent_pid: int, use_pdeathsig: bool) -> None:
    """loky worker initializer: end this worker when the featx process that started it dies.

    Without it a ``kill -9`` of ``fit-heads`` leaves loky workers fitting for minutes: a
    loky worker only notices its parent is gone when it asks for its next task. Linux's
    ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL when the parent exits; it is tied to
    the parent *thread* that forked the worker, so it is only used when that is the main
    thread. A thread polling ``getppid()`` covers other systems and callers.
    """
    if os.getppid() != parent_pid:  # the parent died before this worker got here
        os._exit(1)
    if use_pdeathsig and sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent_pid:  # died between the check and prctl
            os._exit(1)

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="featx-parent-watch", daemon=True).start()


def _import_extra(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ParameterError("backend", extra, f"needs the {extra} package: pip install "
                             f"featx[{extra}]", shown=extra, sep=" ") from None


def check_backend(backend: str, scheduler: str | None = None) -> None:
    """Refuse an unknown ``backend``, a ``scheduler`` for loky, or a missing extra, with one
    line, before any work starts (the cluster itself is reached in :func:`heads_backend`)."""
    check_setting(HeadsConfig, "backend", backend)
    if scheduler and backend == "loky":
        raise ParameterError("scheduler", scheduler, "loky runs on this machine only; add "
                             "{backend} dask or {backend} ray to use a cluster.",
                             shown=scheduler)
    if backend != "loky":
        _import_extra("distributed" if backend == "dask" else "ray", backend)


@contextlib.contextmanager
def heads_backend(backend: str = "loky", *, scheduler: str | None = None,
                  jobs: int = 1) -> Iterator[str]:
    """Run the joblib calls of head fitting inside this block on ``backend``.

    Parameters
    ----------
    backend : {"loky", "dask", "ray"}, default "loky"
        ``loky``: processes on this machine that die with this process. ``dask``: a
        ``dask.distributed.Client`` for ``scheduler``, else the client already open in this
        process, else a ``LocalCluster`` of ``jobs`` single-threaded worker processes.
        ``ray``: ``ray.init(address=scheduler)``, else a local ray with ``jobs`` CPUs.
    scheduler : str or None
        Address of a running dask scheduler (``tcp://host:8786``) or ray cluster
        (``host:6379`` or ``auto``); only with dask or ray.
    jobs : int, default 1
        Size of the local cluster started when there is no ``scheduler``.

    Notes
    -----
    Cluster workers open the cache files by the same path as this process, so the caches
    must be on a filesystem every worker sees. Opening the same backend again inside the
    block (``compare`` around ``fit_heads``) reuses the open one.
    """
    check_backend(backend, scheduler)
    if _OPEN_BACKENDS and _OPEN_BACKENDS[-1] == (backend, scheduler):
        yield backend
        return
    with contextlib.ExitStack() as stack:
        if backend == "loky":
            config = dict(initializer=_die_with_parent, initargs=(
                os.getpid(), threading.current_thread() is threading.main_thread()))
        elif backend == "dask":
            config = dict(client=_dask_client(stack, scheduler, jobs))
        else:
            _start_ray(stack, scheduler, jobs)
            # joblib would memmap large arguments to a local temp folder other nodes cannot
            # read; pickle them into the task instead
            config = dict(max_nbytes=None)
        stack.enter_context(joblib.parallel_config(backend=backend, **config))
        _OPEN_BACKENDS.append((backend, scheduler))
        stack.callback(_OPEN_BACKENDS.pop)
        yield backend


def _dask_client(stack: contextlib.ExitStack, scheduler: str | None, jobs: int):
    distributed = _import_extra("distributed", "dask")
    if scheduler:
        try:
            client = distributed.Client(scheduler, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ParameterError("scheduler", scheduler, f"no dask scheduler answers there "
                                 f"({why}); start one (`dask scheduler`) or leave "
                                 "{scheduler} out for a local cluster.",
                                 shown=scheduler) from None
        stack.callback(client.close)
        return client
    try:
        return distributed.get_client()  # the caller's own client, e.g. in a notebook
    except ValueError:
        pass
    cluster = distributed.LocalCluster(n_workers=max(1, jobs), threads_per_worker=1,
                                       dashboard_address=None, silence_logs=logging.ERROR)
    stack.callback(cluster.close)
    client = distributed.Client(cluster, set_as_default=False)
    stack.callback(client.close)
    return client


def _start_ray(stack: contextlib.ExitStack, scheduler: str | None, jobs: int) -> None:
    ray = _import_extra("ray", "ray")
    from ray.util.joblib import register_ray
    register_ray()
    if ray.is_initialized():
        return
    if scheduler:
        try:
            ray.init(address=scheduler, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ParameterError("scheduler", scheduler, f"no ray cluster answers there "
                                 f"({str(exc).splitlines()[0]}); start one (`ray start "
                                 "--head`) or leave {scheduler} out for a local one.",
                                 shown=scheduler) from None
    else:
        ray.init(num_cpus=max(1, jobs), include_dashboard=False, log_to_driver=False)
    stack.callback(ray.shutdown)
