"""featx/runtime.py: device, precision, worker defaults, the shared setup step, one DistEnv."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import featx.runtime as rt
from featx.backbones import backbone_transform, resolve_run, resolve_weights
from featx.data import DataError


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_has_it(native, monkeypatch):
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: native)
    assert rt.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert rt.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        rt.resolve_precision("fp16", torch.device("cpu"))


def test_auto_precision_is_fp32_for_a_model_that_bf16_moves_too_far(monkeypatch):
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: True)
    assert rt.resolve_precision("auto", torch.device("cpu"), bf16_ok=False) == "fp32"
    # asked for by name it is honoured: the rule is auto's
    assert rt.resolve_precision("bf16", torch.device("cpu"), bf16_ok=False) == "bf16"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_native_bf16_detection_agrees_with_the_cpu_flags():
    """torch's private probes are read with a fallback; a rename must not silently mean fp32."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert rt.cpu_has_native_bf16() == bool(flags & {"amx_tile", "avx512_bf16"})


def test_workers_are_capped_at_the_cores_with_a_note(monkeypatch):
    monkeypatch.setattr(rt, "_usable_cores", lambda: 4)
    assert rt.cap_workers(3) == (3, None)
    n, note = rt.cap_workers(500)
    assert n == 4 and note == "note: workers 500 is more than the 4 CPU core(s) here; using 4."
    with pytest.raises(DataError, match="workers=-1"):
        rt.cap_workers(-1)


def test_default_workers_by_purpose(monkeypatch):
    monkeypatch.setattr(rt.os, "cpu_count", lambda: 32)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    # extraction on the CPU leaves the cores to the forward; a GPU run feeds it from 8
    assert rt.extract_workers(torch.device("cpu")) == 8
    assert rt.extract_workers(torch.device("cuda")) == rt.DEFAULT_MAX_WORKERS == 8
    monkeypatch.setattr(rt.os, "cpu_count", lambda: 2)
    assert rt.extract_workers(torch.device("cpu")) == 0
    assert rt.finetune_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 torchrun processes share the 2 cores
    assert rt.finetune_workers() == 1


def test_setup_resolves_device_precision_weights_transform_in_order(tmp_path):
    ready = resolve_run("resnet18", "none", device="cpu", precision="fp32", image_size=48, seed=3)
    assert (ready.device, ready.precision) == (torch.device("cpu"), "fp32")
    want = resolve_weights("resnet18", "none", seed=3)
    assert ready.weights.tag == want.tag and ready.weights.source == want.source
    assert ready.transform.to_dict() == backbone_transform("resnet18", want, 48).to_dict()
    assert ready.transform.crop == 48
    # the first bad option is the one reported: the device before precision and weights
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="device='tpu'"):
        resolve_run("resnet18", missing, device="tpu", precision="nope")
    with pytest.raises(ValueError, match="precision='nope'"):
        resolve_run("resnet18", missing, device="cpu", precision="nope")


def test_one_reader_of_rank_and_world_size(monkeypatch):
    """dist_env is the one reader: a plain run is rank 0 of 1; torchrun's variables give its
    place before any group is joined; extraction and fine-tuning both ask it."""
    from featx.distributed import DistEnv, dist_env, is_main_process, launched_by_torchrun
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert dist_env() == DistEnv() and not launched_by_torchrun() and is_main_process()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert dist_env() == DistEnv(1, 2, 1) and launched_by_torchrun()
    assert not is_main_process()


def test_predict_computes_the_cached_features_to_the_bit(head_experiment):
    """After setup, one build (featx.extract.frozen_model) serves extract and predict: the
    features predict computes for the cache's own test images are the cached rows, bit for
    bit (a backbone built without the BatchNorm folding moves them by ~1e-6)."""
    import numpy as np

    from featx.apply import find_images, load_predictor, predict_batches
    from featx.cache import Cache

    ex = head_experiment
    cache = Cache(ex.cache)
    predictor = load_predictor(ex.results[("pool2", "logistic")], device="cpu")
    seen, forward = [], predictor.frozen.features

    def spy(images, pools):
        seen.append(forward(images, pools))
        return seen[-1]

    predictor.frozen.features = spy
    images = find_images([ex.data / p for p, _ in cache.split_items("test")], cache.classes)
    # one batch, as extract's (batch size 32): the same shapes, so the same kernels
    list(predict_batches(predictor, images, batch_size=32))
    assert len(seen) == 1
    for feature in ("penultimate", "pool2"):
        np.testing.assert_array_equal(seen[0][feature], cache.load("test", feature),
                                      err_msg=feature)
