"""Inference engines for the frozen forward: torch itself, or an exported ONNX graph run by
ONNX Runtime or OpenVINO on the CPU.

The exported graph is the prepared :class:`~featx.backbones.build.FeatureModel` (BatchNorm
folded), input ``(B, 3, H, W)`` normalised fp32 images, outputs the last spatial map
``(B, C, h, w)`` and ``penultimate`` ``(B, D)``; normalising and the ``pool{n}`` are done in
torch around it by :func:`~featx.backbones.frozen.forward_batch`, exactly as for torch, so
one exported file serves every choice of pools. It is written once per model + weights
(sha256) + image size (+ torch and exporter versions) under
``torch.hub.get_dir()/featx-engines/`` and reused by every later run (:func:`exported_model`).

:func:`resolve_engine` turns ``auto`` into an engine: torch on CUDA and for bf16/fp16 (the
engines run fp32 here), else the first installed of :data:`AUTO_ORDER`, the order measured
in BENCHMARKS.md. Engines are optional extras (``pip install featx[onnx]`` /
``featx[openvino]``); asking for one that is not installed is a one-line error. With
both ``auto``, a CPU without AMX runs fp32 in an engine rather than bf16 in torch
(:func:`fp32_engine_beats_bf16`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import re
from pathlib import Path
from typing import Callable

import torch

from featx.backbones.registry import is_timm
from featx.config import ExtractConfig, check_setting
from featx.errors import FeatxError, Note, ParameterError
from featx.files import atomic_write
from featx.runtime import cpu_has_amx

__all__ = ["AUTO_ORDER", "EXPORT_FORMAT", "EngineError", "engine_runner", "engine_version",
           "export_dir", "exported_model", "fp32_engine_beats_bf16", "installed_engines",
           "resolve_engine"]

# auto's preference among the installed CPU engines, fastest first (BENCHMARKS.md, "Engines")
AUTO_ORDER = ("openvino", "onnxruntime")
# what each engine needs importable, and the extra that installs it
_NEEDS = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"),
          "openvino": ("openvino", "onnx", "onnxscript")}
_EXTRA = {"onnxruntime": "onnx", "openvino": "openvino"}
# bump when the exported graph changes (inputs, outputs, what it contains)
EXPORT_FORMAT = 1
_OUTPUTS = ("map", "penultimate")


class EngineError(FeatxError, RuntimeError):
    """An engine that cannot run here, or an exported graph that cannot be made or loaded."""


def _missing(engine: str) -> str | None:
    """The first module ``engine`` needs that is not installed, else ``None``."""
    # found, not imported: importing openvino and onnxscript costs ~1-2 s, which a re-run
    # of a finished extract (resolving auto, then finding the cache up to date) must not pay
    for module in _NEEDS[engine]:
        if importlib.util.find_spec(module) is None:
            return module
    return None


def installed_engines() -> list[str]:
    """The CPU engines whose packages import here, in :data:`AUTO_ORDER`."""
    return [e for e in AUTO_ORDER if _missing(e) is None]


# the distributions that provide each engine's module
_DISTS = {"onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
          "openvino": ("openvino",)}


def engine_version(engine: str) -> str:
    """``engine``'s package version (torch's for ``torch``)."""
    if engine == "torch":
        return torch.__version__
    # from the installed metadata: the provenance is built before a finished cache is
    # found up to date, and importing the engine there would cost a no-op re-run seconds
    for dist in _DISTS[engine]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return importlib.import_module(engine).__version__


def fp32_engine_beats_bf16(device: torch.device) -> bool:
    """Whether ``--precision auto --engine auto`` should run fp32 in an engine rather than
    bf16 in torch on ``device``: on a CPU without AMX with an engine installed.

    On AVX512-BF16 without AMX (AMD EPYC, machine D) OpenVINO fp32 ran resnet18/resnet50
    2.2x/1.9x faster than torch bf16, and keeps fp32's features. With AMX torch's bf16
    measured 2.75x torch fp32 (machine A), more than the 1.5-2.6x any engine reached over
    torch fp32 elsewhere (engines not measured on AMX), so bf16 stays torch's there.
    BENCHMARKS.md, "Engines".
    """
    return device.type == "cpu" and not cpu_has_amx() and bool(installed_engines())


def resolve_engine(engine: str, device: torch.device, precision: str) -> str:
    """``auto`` -> an engine for ``device`` and the resolved ``precision``; an explicit one is
    checked (CPU, fp32, installed).

    ``auto`` is torch on CUDA and for bf16/fp16 (the engines run fp32 here; with AMX
    torch's bf16 is the fastest path measured), else the first installed of
    :data:`AUTO_ORDER`, else torch.
    """
    check_setting(ExtractConfig, "engine", engine)
    if engine == "auto":
        if device.type != "cpu" or precision != "fp32":
            return "torch"
        return next(iter(installed_engines()), "torch")
    if engine == "torch":
        return engine
    if device.type != "cpu":
        raise ParameterError("engine", engine, f"runs on the CPU; on {device} use {{engine}} "
                             f"torch (or auto).")
    if precision != "fp32":
        raise ParameterError("engine", engine, f"runs fp32 here, not {precision}; pass "
                             f"{{precision}} fp32, or {{engine}} torch for {precision}.")
    module = _missing(engine)
    if module is not None:
        raise EngineError(f"{{engine}} {engine} needs {module}, which is not installed: "
                          f"pip install featx[{_EXTRA[engine]}] (or use {{engine}} torch).")
    return engine


# -- the exported graph ---------------------------------------------------------------------

def export_dir() -> Path:
    """Where exported graphs live: beside the torch hub cache (``$TORCH_HOME/hub``)."""
    return Path(torch.hub.get_dir()) / "featx-engines"


def _export_key(model: str, weights_sha256: str, image_size: int) -> dict:
    import onnxscript
    key = {"format": EXPORT_FORMAT, "model": model, "weights_sha256": weights_sha256,
           "image_size": int(image_size), "precision": "fp32", "torch": torch.__version__,
           "onnxscript": onnxscript.__version__}
    if is_timm(model):
        import timm
        key["timm"] = timm.__version__
    return key


def _export_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", key["model"])
    return export_dir() / f"{safe}_{key['image_size']}px_fp32_{digest}.onnx"


# test hook: how many graphs this process exported
exports = {"count": 0}


def _export(network: torch.nn.Module, image_size: int, path: Path, model: str) -> None:
    """Export ``network`` (on the CPU, fp32) with a dynamic batch dimension to ``path``,
    atomically: an interrupted export leaves no file under the final name."""
    import warnings
    x = torch.zeros(2, 3, image_size, image_size)
    try:
        with atomic_write(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            # the exporter's notes on its own internals are not the user's to act on
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                network, (x,), input_names=["images"], output_names=list(_OUTPUTS),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                verbose=False)
            # one self-contained file (no external .data beside it: the rename moves all)
            program.save(str(tmp), external_data=False)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise EngineError(f"could not export {model} to ONNX "
                          f"({type(exc).__name__}: {reason}); use {{engine}} torch.") from None
    exports["count"] += 1


def exported_model(network: torch.nn.Module, model: str, weights_sha256: str, image_size: int,
                   load: Callable[[Path], object], notes: list[str] | None = None):
    """``load(path)`` of ``network``'s exported graph, exporting it first when no file for
    this model + weights + image size exists. A file that does not load (corrupt, cut
    short) is exported again, once, with a note; if the fresh one does not load either,
    :class:`EngineError` says so in one line."""
    path = _export_path(_export_key(model, weights_sha256, image_size))
    fresh = not path.is_file()
    if fresh:
        _export(network, image_size, path, model)
    try:
        return load(path)
    except Exception as exc:
        if fresh:
            path.unlink(missing_ok=True)  # the next run exports again rather than load it
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            raise EngineError(f"the graph exported for {model} ({path}) does not load "
                              f"({type(exc).__name__}: {reason}); use {{engine}} torch."
                              ) from None
        if notes is not None:
            notes.append(Note(f"note: {path.name} did not load ({type(exc).__name__}); "
                              f"exported it again."))
        path.unlink(missing_ok=True)
    return exported_model(network, model, weights_sha256, image_size, load, notes)


# -- running it -----------------------------------------------------------------------------

def _onnxruntime_session(path: Path):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()  # the threads torch would use
    opts.log_severity_level = 3  # errors only: its graph-optimisation warnings are not ours
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor):
        return session.run(list(_OUTPUTS), {"images": x.numpy()})
    return run


def _openvino_model(path: Path):
    import openvino as ov
    compiled = ov.Core().compile_model(str(path), "CPU", {
        "PERFORMANCE_HINT": "LATENCY",
        # OpenVINO computes in bf16 by default on native-bf16 CPUs: keep fp32's features
        "INFERENCE_PRECISION_HINT": "f32",
        "INFERENCE_NUM_THREADS": torch.get_num_threads()})
    request = compiled.create_infer_request()
    outputs = [compiled.output(name) for name in _OUTPUTS]

    def run(x: torch.Tensor):
        result = request.infer({0: x.numpy()})
        return [result[o] for o in outputs]
    return run


_LOADERS = {"onnxruntime": _onnxruntime_session, "openvino": _openvino_model}


def engine_runner(engine: str, network: torch.nn.Module, model: str, weights_sha256: str,
                  image_size: int, notes: list[str] | None = None) -> Callable:
    """A callable with ``network``'s signature, ``(B, 3, H, W)`` fp32 -> ``(map, penultimate)``
    tensors, that runs the exported graph in ``engine`` (``onnxruntime`` or ``openvino``)."""
    run = exported_model(network.cpu(), model, weights_sha256, image_size, _LOADERS[engine],
                         notes)

    def forward(x: torch.Tensor):
        fmap, pen = run(x.float().contiguous())  # the graph takes NCHW fp32
        return torch.from_numpy(fmap), torch.from_numpy(pen)
    return forward
