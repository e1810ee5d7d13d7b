"""`featx compare` end to end on tiny data, twice; `featx demo` with its smallest settings."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from featx.cache import Cache
from featx.cli import main
from featx.compare import _heads_up_to_date, run_compare
from featx.config import CompareConfig, HeadsConfig
from featx.data import load_dataset
from featx.heads import fit_heads
from featx.results import read_result
from tests.builders import PNEUMONIA, assert_close_results, blob_splits, write_cache


def _cfg(tmp_path, **kw):
    base = dict(models=("resnet18",), pools=(1, 2), heads=("logistic", "linear"),
                finetune="backbone", epochs=1, weights="none", image_size=32, batch_size=16,
                workers=0, cache_dir=tmp_path / "cache", out=tmp_path / "results",
                progress=False)
    base.update(kw)
    return CompareConfig(**base)


def _mtimes(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.json") if "report" not in p.parts}


def test_compare_runs_everything_then_reuses_everything(digits_dir, tmp_path):
    data = load_dataset(digits_dir)
    first = run_compare(data, _cfg(tmp_path), log=lambda m: None)
    assert len(first.done) == 3 and not first.skipped  # extract, heads, finetune
    results = [read_result(p) for p in (tmp_path / "results").rglob("*.json")
               if "report" not in p.parts and p.name != "heads_summary.json"
               and read_result_ok(p)]
    kinds = sorted({r["kind"] for r in results})
    assert kinds == ["finetune", "head"]
    # heads and fine-tuning were scored on the very same test images
    assert len({r["dataset"]["test_fingerprint"] for r in results}) == 1
    # penultimate and pool2 x 2 heads: resnet18's pool1 is its penultimate, fitted once
    assert len([r for r in results if r["kind"] == "head"]) == 2 * 2
    before = _mtimes(tmp_path / "results")

    second = run_compare(data, _cfg(tmp_path), log=lambda m: None)
    assert second.done == [] and len(second.skipped) == 3
    assert _mtimes(tmp_path / "results") == before


def read_result_ok(p):
    try:
        read_result(p)
        return True
    except ValueError:
        return False


def test_compare_redoes_only_what_is_missing(digits_dir, tmp_path):
    """The second run fits the missing heads on dask (the client open in this process, when
    dask is installed) and gets what loky got."""
    data = load_dataset(digits_dir)
    run_compare(data, _cfg(tmp_path, finetune="none"), log=lambda m: None)
    heads_dir = next((tmp_path / "results").glob("*/heads"))
    before = read_result(heads_dir / "pool2__linear.json")
    (heads_dir / "pool2__linear.json").unlink()
    try:
        import distributed
    except ImportError:
        distributed = None
    with contextlib.ExitStack() as stack:
        if distributed is not None:
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None))
            client = stack.enter_context(distributed.Client(cluster))
            stream = stack.enter_context(distributed.get_task_stream(client))
        again = run_compare(data, _cfg(tmp_path, finetune="none",
                                       backend="dask" if distributed else "loky"),
                            log=lambda m: None)
    assert any("extract" in s for s in again.skipped)
    assert again.done == [next(d for d in again.done if d.startswith("heads"))]
    assert again.done[0].endswith("pool2")
    after = read_result(heads_dir / "pool2__linear.json")
    if distributed is not None:  # only the missing pool2 linear runs (the other pool2 result is reused)
        assert sum("run_indexed" in str(t["key"]) for t in stream.data) == 1
    for r in (before, after):
        for key in ("fit_s", "select_s", "predict_s"):
            r["metrics"].pop(key)
    # fitted again on dask's worker threads or loky's processes: floats to CROSS_RTOL
    assert_close_results(after["metrics"], before["metrics"])
    assert_close_results(after["selection"], before["selection"])


@pytest.mark.parametrize("args, words", [
    (("--scheduler", "tcp://10.0.0.1:8786"), "loky runs on this machine only"),
    (("--backend", "dask"), "--backend dask needs the dask package: pip install featx[dask]"),
])
def test_compare_bad_backend_is_one_line_before_any_extraction(digits_dir, tmp_path,
                                                               monkeypatch, args, words):
    monkeypatch.setitem(sys.modules, "distributed", None)
    r = CliRunner().invoke(main, ["compare", "--data", str(digits_dir), "--models", "resnet18",
                                  "--cache-dir", str(tmp_path / "c"), *args])
    assert r.exit_code == 1 and r.output.startswith("Error:") and words in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_compare_reuses_a_cache_with_more_pools_and_fits_only_what_it_asks(digits_dir,
                                                                           tmp_path):
    data = load_dataset(digits_dir)
    run_compare(data, _cfg(tmp_path, pools=(1, 2), finetune="none"), log=lambda m: None)
    fewer = run_compare(data, _cfg(tmp_path, pools=(1,), finetune="none",
                                   out=tmp_path / "fewer"), log=lambda m: None)
    assert any(s.startswith("extract resnet18: up-to-date") for s in fewer.skipped)
    fitted = sorted(p.name for p in (tmp_path / "fewer").rglob("*__*.json"))
    # resnet18's pool1 is its penultimate: stored once, fitted and reported once
    assert fitted == ["penultimate__linear.json", "penultimate__logistic.json"]


def test_compare_cli_bad_finetune_mode_and_model(digits_dir, tmp_path):
    r = CliRunner().invoke(main, ["compare", "--data", str(digits_dir), "--models", "resnet81"])
    assert r.exit_code != 0 and "Error: unknown model 'resnet81'" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(main, ["compare", "--data", str(digits_dir), "--models", "resnet18",
                                  "--finetune", "sideways", "--cache-dir", str(tmp_path / "c")])
    assert r.exit_code == 2 and "Invalid value for '--finetune'" in r.output
    assert "'sideways' is not one of 'none', 'full', 'backbone', 'both'" in r.output
    assert "Traceback" not in r.output
    with pytest.raises(ValueError, match="finetune='sideways': use one of none, full"):
        run_compare(load_dataset(digits_dir), _cfg(tmp_path, finetune="sideways"))
    assert not (tmp_path / "cache").exists()  # refused before any extraction


def test_compare_reuses_head_results_only_with_the_same_seed_and_class_weight(tmp_path):
    """A head result made with another seed or class weight is not "current" for compare;
    one made with the same settings is, on any backend."""
    path = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(pools=(1,)))
    out = tmp_path / "results"
    features, heads = ["penultimate", "pool1"], ["linear", "logistic"]
    fit_heads([path], HeadsConfig(heads=tuple(heads), features=tuple(features), seed=0,
                                  out_dir=out))
    cache = Cache(path)

    def current(**kw):
        return _heads_up_to_date(cache, features, heads, out, _cfg(tmp_path, **kw))
    assert current(seed=0) == features
    assert current(seed=0, backend="dask", jobs=4) == features
    assert current(seed=1) == []
    assert current(seed=0, class_weight="balanced") == []
    fit_heads([path], HeadsConfig(heads=("linear",), features=("pool1",), seed=0,
                                  class_weight="balanced", out_dir=out))
    assert current(seed=0, class_weight="balanced") == []  # logistic is still unweighted
    assert current(seed=0) == ["penultimate"]


def test_demo_quick_uses_imagenet_weights_and_prints_the_table(tmp_path, mobilenet_in_hub):
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(tmp_path / "res"),
                                  "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "ImageNet weights for mobilenet_v2" in r.output
    assert "logistic @ pool2" in r.output and "finetune" in r.output
    pngs = list((tmp_path / "res" / "report").glob("*.png"))
    assert pngs and all(str(p) in r.output for p in pngs[:1])


@pytest.mark.skipif(not PNEUMONIA.is_dir(), reason="../shared/data/pneumoniamnist is absent")
def test_pneumonia_xrays_end_to_end_real_transfer(tmp_path, mobilenet_in_hub):
    """Real chest X-rays, real ImageNet mobilenet_v2: the frozen features transfer.

    A stratified subset (CSV manifest into the shared folder) keeps this under a minute.
    """
    import numpy as np
    rng = np.random.default_rng(0)
    rows = ["path,label,split"]
    take = {"train": 300, "val": 100, "test": 200}
    for split, n in take.items():
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((PNEUMONIA / split / cls).glob("*.png"))
            for f in rng.choice(files, n // 2, replace=False):
                rows.append(f"{f},{cls},{split}")
    manifest = tmp_path / "xray.csv"
    manifest.write_text("\n".join(rows) + "\n")
    r = CliRunner().invoke(main, [
        "compare", "--data", str(manifest), "--models", "mobilenet_v2", "--pool", "1,2",
        "--heads", "logistic", "--finetune", "none", "--image-size", "64", "--workers", "0",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "res"),
        "--no-progress"])
    assert r.exit_code == 0, r.output
    res = read_result(next((tmp_path / "res").rglob("penultimate__logistic.json")))
    assert res["dataset"]["classes"] == ["NORMAL", "PNEUMONIA"]
    assert res["metrics"]["n"] == 200
    assert res["metrics"]["balanced_accuracy"] > 0.7  # chance is 0.5
    assert res["metrics"]["roc_auc"] > 0.8
