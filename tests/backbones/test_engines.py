"""featx/backbones/engines.py: the exported graph in ONNX Runtime / OpenVINO gives torch
fp32's features, is exported once and reused, survives a corrupt file, and an engine that
is not installed is one line."""
from __future__ import annotations

import csv
import sys

import h5py
import numpy as np
import pytest
import torch

from featx.backbones import EngineError, engines, installed_engines, resolve_engine
from featx.config import ExtractConfig
from featx.data import load_dataset
from featx.extract import extract
from tests.builders import write_digits
from tests.builders import assert_one_line_error

ENGINES = ("onnxruntime", "openvino")
# The engines' own kernels (other conv algorithms, other summation orders, fused ops) round
# fp32 differently from torch's oneDNN path: measured up to 1.4e-6 of a feature's largest
# value (resnet18, mobilenet_v2), ~10x fp32's epsilon after ~50 layers. 1e-5 is the
# contract (issue 23, as for BatchNorm folding): 7x that noise, far below any real change
# (bf16 moves them by 3e-3 and more).
TOL = 1e-5

CPU = torch.device("cpu")


def _have(engine: str) -> bool:
    # installed_engines() is empty in tests (conftest pins auto to torch): ask the packages
    return engines._missing(engine) is None


def _installed(engine: str):
    if not _have(engine):
        pytest.skip(f"{engine} is not installed (pip install featx[{engines._EXTRA[engine]}])")


@pytest.fixture(scope="module")
def export_home(tmp_path_factory):
    return tmp_path_factory.mktemp("hub") / "featx-engines"


@pytest.fixture(autouse=True)
def _module_export_dir(export_home, monkeypatch):
    """The module's tests share one folder of exported graphs (an export costs seconds);
    the tests that count exports use image sizes no other test uses."""
    monkeypatch.setattr(engines, "export_dir", lambda: export_home)


def _features(path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {f"{s}/{k}": f[s][k][:] for s in ("train", "val", "test")
                for k in f[s] if k not in ("labels", "paths")}


def _run(data, out, engine, model="resnet18", weights="none", size=48, **kw):
    return extract(data, ExtractConfig(model, weights=weights, pools=(1, 2), image_size=size,
                                       workers=0, precision="fp32", engine=engine,
                                       out_dir=out, progress=False, **kw))


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory):
    return load_dataset(write_digits(tmp_path_factory.mktemp("engines") / "d", per_class=6))


@pytest.fixture(scope="module")
def torch_reference(small_digits, tmp_path_factory):
    """``reference(model, weights, size)``: torch fp32's features of ``small_digits``."""
    out, seen = tmp_path_factory.mktemp("torch_ref"), {}

    def reference(model="resnet18", weights="none", size=48):
        if (model, size) not in seen:
            seen[model, size] = _features(_run(small_digits, out, "torch", model, weights,
                                               size).path)
        return seen[model, size]
    return reference


def _assert_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        err = np.abs(got[k] - ref[k]).max() / np.abs(ref[k]).max()
        assert err <= TOL, (k, err)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_features_equal_torch_fp32_on_random_resnet18(engine, small_digits, tmp_path,
                                                             torch_reference):
    _installed(engine)
    got = _run(small_digits, tmp_path / engine, engine)
    assert got.engine == engine
    _assert_close(_features(got.path), torch_reference())
    with h5py.File(got.path) as f:
        assert f.attrs["engine"] == engine
        assert f.attrs["engine_version"] == engines.engine_version(engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_engine_features_equal_torch_fp32_on_imagenet_mobilenet_v2(engine, mobilenet_in_hub,
                                                                     small_digits, tmp_path,
                                                                     torch_reference):
    _installed(engine)
    got = _run(small_digits, tmp_path / engine, engine, "mobilenet_v2", "imagenet", 64)
    _assert_close(_features(got.path), torch_reference("mobilenet_v2", "imagenet", 64))


def test_the_exported_graph_is_reused_by_the_next_run(small_digits, tmp_path, export_home):
    _installed("onnxruntime")
    before = engines.exports["count"]
    _run(small_digits, tmp_path / "a", "onnxruntime", size=40)
    assert engines.exports["count"] == before + 1
    _run(small_digits, tmp_path / "b", "onnxruntime", size=40)  # another cache, same graph
    assert engines.exports["count"] == before + 1
    if _have("openvino"):  # one file serves both engines
        _run(small_digits, tmp_path / "c", "openvino", size=40)
        assert engines.exports["count"] == before + 1
    graph, = export_home.glob("resnet18_40px_fp32_*.onnx")
    # another image size, other weights or another torch: another file (no export needed
    # to see it: the name is the key's digest)
    key = engines._export_key("resnet18", "none-seed0", 40)
    assert engines._export_path(key) == graph
    for change in ({"image_size": 36}, {"weights_sha256": "none-seed1"}, {"torch": "9.9"}):
        assert engines._export_path({**key, **change}) != graph, change


def test_a_corrupt_exported_graph_is_exported_again(small_digits, tmp_path, export_home,
                                                     torch_reference):
    _installed("onnxruntime")
    _run(small_digits, tmp_path / "a", "onnxruntime")  # resnet18 at 48 px
    graph, = export_home.glob("resnet18_48px_fp32_*.onnx")
    graph.write_bytes(graph.read_bytes()[:1000])  # cut short, as by a full disk elsewhere
    before = engines.exports["count"]
    again = _run(small_digits, tmp_path / "b", "onnxruntime")
    assert engines.exports["count"] == before + 1
    assert any("did not load" in n and "exported it again" in n for n in again.notes)
    _assert_close(_features(again.path), torch_reference())


def test_a_fresh_graph_that_does_not_load_is_one_line(small_digits, tmp_path, monkeypatch,
                                                      export_home):
    _installed("onnxruntime")

    def broken_export(network, image_size, path, model):  # an exporter that writes garbage
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an onnx graph")
    monkeypatch.setattr(engines, "_export", broken_export)
    with pytest.raises(EngineError, match="does not load .*use engine torch"):
        _run(small_digits, tmp_path / "a", "onnxruntime", size=52)
    assert not list(export_home.glob("resnet18_52px_*"))  # the next run exports again
    # no cache, complete or partial, claims those features
    assert not [p for p in (tmp_path / "a").glob("*") if p.suffix in (".h5", ".partial")]


def test_a_missing_engine_is_one_line_naming_the_extra(digits_dir, tmp_path, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    r = cli("extract", "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--workers", "0", "--no-progress", "--data", digits_dir, "--out", tmp_path,
            "--engine", "onnxruntime")
    assert_one_line_error(r, "--engine onnxruntime needs onnxruntime",
                          "pip install featx[onnx]")
    assert not list(tmp_path.glob("*.h5*"))


def test_auto_picks_an_installed_cpu_engine_only_for_fp32_on_the_cpu(monkeypatch):
    monkeypatch.setattr(engines, "AUTO_ORDER", ("openvino", "onnxruntime"))
    have = installed_engines()
    assert resolve_engine("auto", CPU, "fp32") == (have[0] if have else "torch")
    assert resolve_engine("auto", CPU, "bf16") == "torch"  # native bf16: torch is fastest
    assert resolve_engine("auto", torch.device("cuda"), "fp32") == "torch"
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert resolve_engine("auto", CPU, "fp32") == ("onnxruntime" if "onnxruntime" in have
                                                   else "torch")


@pytest.mark.parametrize("amx", [True, False])
def test_auto_and_auto_on_a_native_bf16_cpu_run_bf16_in_torch_only_with_amx(amx, monkeypatch):
    import featx.runtime as rt
    from featx.backbones import resolve_run
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(engines, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(engines, "AUTO_ORDER", ("openvino", "onnxruntime"))
    have = installed_engines()
    ready = resolve_run("resnet18", "none", device="cpu", precision="auto", engine="auto")
    if amx or not have:
        assert (ready.precision, ready.engine) == ("bf16", "torch")
    else:  # AVX512-BF16 alone: an engine's fp32 measured ~2x torch's bf16
        assert (ready.precision, ready.engine) == ("fp32", have[0])
    # an engine asked for by name gets fp32; torch asked for by name keeps auto's bf16
    assert resolve_run("resnet18", "none", device="cpu", engine="torch").precision == "bf16"


def test_an_explicit_engine_runs_fp32_on_the_cpu_only():
    with pytest.raises(ValueError, match="engine='onnxruntime': runs fp32 here, not bf16"):
        resolve_engine("onnxruntime", CPU, "bf16")
    with pytest.raises(ValueError, match="runs on the CPU"):
        resolve_engine("openvino", torch.device("cuda"), "fp32")
    with pytest.raises(ValueError, match="engine='tensorrt'"):
        resolve_engine("tensorrt", CPU, "fp32")


def test_a_cache_from_torch_serves_a_run_with_an_engine(small_digits, tmp_path):
    """The engine is recorded, not compared: features agree within 1e-5 (TOL), like two
    runs of torch on two CPU kinds, so another engine does not make a cache stale."""
    _installed("onnxruntime")
    first = _run(small_digits, tmp_path, "torch", size=32)
    again = _run(small_digits, tmp_path, "onnxruntime", size=32)
    assert again.status == "up-to-date" and again.path == first.path
    with h5py.File(first.path) as f:
        assert f.attrs["engine"] == "torch"


def _probabilities(path) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c for c in rows[0] if c.startswith("prob_")]
    return np.array([[float(r[c]) for c in cols] for r in rows])


def test_predict_runs_the_backbone_in_the_engine(head_experiment, tmp_path):
    _installed("onnxruntime")
    from featx.apply import predict
    ex = head_experiment
    head = ex.results[("pool2", "logistic")]
    runs = {e: predict(head, [ex.data], tmp_path / f"{e}.csv", engine=e, progress=False)
            for e in ("torch", "onnxruntime")}
    a, b = (_probabilities(tmp_path / f"{e}.csv") for e in runs)
    assert runs["onnxruntime"].n_images == runs["torch"].n_images > 0
    # probabilities of a logistic head on features within TOL: within 1e-4 of each other
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("extra", [("--layers", "stages"), ("--keep-map",)])
def test_layers_or_kept_maps_in_an_exported_graph_engine_are_one_line_and_write_nothing(
        extra, digits_dir, tmp_path, cli):
    """An exported graph gives the last map and the penultimate only: --layers / --keep-map
    with an engine named explicitly are refused before any file is written (auto runs them in
    torch, tests/backbones/test_layers.py)."""
    r = cli("extract", "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--workers", "0", "--no-progress", "--data", digits_dir, "--out", tmp_path / "c",
            "--engine", "openvino", "--pool", "1", *extra)
    assert_one_line_error(r, "--engine openvino extracts the penultimate", "--engine torch")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())
