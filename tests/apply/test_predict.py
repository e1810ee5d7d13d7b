"""featx predict: the recorded backbone + head on new images, equal to the cached path;
folders, manifests and file lists; unreadable files; refusals; streaming; fine-tuned runs."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision import models

from featx.apply import find_images, load_predictor, predict, predict_batches
from featx.artifacts import file_sha256
from featx.cache import Cache
from featx.heads import class_scores, load_head
from featx.results import read_result
from tests.builders import assert_one_line_error, malicious_pickle
from tests.builders import invoke_cli as run


def _test_manifest(cache, data, manifest):
    """Write ``cache``'s test split (images under ``data``) as a CSV manifest at
    ``manifest``, paths relative to its folder; returns the split's items."""
    items = cache.split_items("test")
    pd.DataFrame({"path": [os.path.relpath(data / p, manifest.parent) for p, _ in items],
                  "label": [cache.classes[y] for _, y in items]}).to_csv(manifest, index=False)
    return items


def test_streaming_csv_manifest_of_test_split_reproduces_cached_head(head_experiment,
                                                                     tmp_path):
    """Predicting the cache's own test images equals the head applied to the cached rows:
    same labels, same probabilities, and so the very metrics fit-heads reported."""
    ex = head_experiment
    result_path = ex.results[("pool2", "logistic")]
    cache = Cache(ex.cache)
    items = _test_manifest(cache, ex.data, ex.data / "test_manifest.csv")
    manifest = ex.data / "test_manifest.csv"

    out = tmp_path / "pred.csv"
    run_ = predict(result_path, [manifest], out, batch_size=4, progress=False)
    df = pd.read_csv(out)
    X = cache.load("test", "pool2")
    pipe = load_head(result_path)
    assert list(df.columns) == ["path", "predicted", "label"] + [f"prob_{c}"
                                                                 for c in cache.classes]
    assert df["path"].tolist() == [str(ex.data / p) for p, _ in items]
    assert df["predicted"].tolist() == [cache.classes[k] for k in pipe.predict(X)]
    np.testing.assert_allclose(df.iloc[:, 3:].to_numpy(), class_scores(pipe, X, 3), atol=1e-5)
    reported = read_result(result_path)["metrics"]
    assert run_.metrics["accuracy"] == reported["accuracy"]
    assert run_.metrics["confusion_matrix"] == reported["confusion_matrix"]
    # pandas' read_json parses floats with its fast parser (precise_float=False), off by a
    # few ulp (0.8888888888888881 for ...888): equal to 1e-12, not bit for bit
    assert pd.read_json(run_.metrics_json, typ="series")["balanced_accuracy"] == \
        pytest.approx(reported["balanced_accuracy"], rel=1e-12)


def test_cli_folder_and_files_skip_unreadable_and_report_it(head_experiment, tmp_path):
    ex = head_experiment
    new = tmp_path / "new"
    shutil.copytree(ex.data / "digit1", new / "digit1")
    (new / "digit1" / "broken.png").write_bytes(b"not a png at all")
    loose = sorted((ex.data / "digit2").glob("*.png"))[:3]
    out = tmp_path / "out" / "p.csv"
    for cmd in ("predict", "export"):
        assert "Usage:" in run(cmd, "--help").output
    # the head comes from FEATX_HEAD, like every option's FEATX_ variable
    r = run("predict", "--data", new, *loose, "--out", out, "--no-progress", "--batch-size", 8,
            env={"FEATX_HEAD": str(ex.results[("penultimate", "logistic")])})
    assert r.exit_code == 0, r.output
    assert "skipped 1 unreadable file(s)" in r.output and "broken.png" in r.output
    df = pd.read_csv(out)
    assert len(df) == 20 + 3 and not df["path"].str.endswith("broken.png").any()
    # some images carry no label, so there is no label column and no metrics file
    assert "label" not in df.columns and not (tmp_path / "out" / "p_metrics.json").exists()
    assert np.allclose(df.filter(like="prob_").sum(axis=1), 1, atol=1e-6)
    assert (df["predicted"].iloc[:20] == "digit1").mean() > 0.8  # it learned something
    skipped = pd.read_csv(tmp_path / "out" / "p_skipped.csv")
    assert skipped["path"].tolist() == [str(new / "digit1" / "broken.png")]


def test_refuses_replaced_weights_file_and_keeps_earlier_predictions(head_experiment,
                                                                     tmp_path):
    ex = head_experiment
    out = tmp_path / "p.csv"
    args = ["predict", "--head", ex.results[("pool2", "logistic")], "--data",
            ex.data / "digit0", "--out", out, "--no-progress"]
    assert run(*args).exit_code == 0
    before = out.read_bytes()
    original = ex.weights.read_bytes()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            torch.save(models.resnet18().state_dict(), ex.weights)
        r = run(*args)
        assert_one_line_error(r, "weights differ", "sha256")
        # the same refusal for export, and for a --weights file that is not the recorded one
        assert_one_line_error(run("export", ex.results[("pool2", "logistic")], "--out",
                           tmp_path / "m.pt2"), "weights differ")
    finally:
        ex.weights.write_bytes(original)
    assert out.read_bytes() == before and not (tmp_path / "m.pt2").exists()
    other = tmp_path / "other.pth"
    torch.save(models.resnet18().state_dict(), other)
    assert_one_line_error(run(*args, "--weights", other), "weights differ")


def test_refuses_missing_head_file_and_wrong_result_kind(head_experiment, tmp_path):
    ex = head_experiment
    result = ex.results[("penultimate", "logistic")]
    model_file = result.with_suffix(".skops")
    moved = tmp_path / "moved.skops"
    shutil.move(model_file, moved)
    try:
        assert_one_line_error(run("predict", "--head", result, "--data", ex.data, "--out",
                           tmp_path / "p.csv"), "missing", "re-run fit-heads")
    finally:
        shutil.move(moved, model_file)
    assert_one_line_error(run("predict", "--finetuned", result, "--data", ex.data),
                   "is a head result", "--head")
    # a result whose model is not the one its pipeline was fitted for
    other = tmp_path / "other.json"
    record = json.loads(result.read_text())
    record["model"] = record["provenance"]["model"] = "mobilenet_v2"
    other.write_text(json.dumps(record))
    shutil.copy(model_file, tmp_path / model_file.name)
    assert_one_line_error(run("predict", "--head", other, "--data", ex.data, "--out",
                       tmp_path / "p.csv"), "mobilenet_v2", "512", "1280")
    assert not (tmp_path / "p.csv").exists()


def test_images_are_read_batch_by_batch(head_experiment, tmp_path):
    """Streaming: a file broken after the first batch came out is found broken, so it had
    not been read yet (nothing is loaded up front)."""
    ex = head_experiment
    folder = tmp_path / "imgs"
    shutil.copytree(ex.data / "digit0", folder)
    predictor = load_predictor(ex.results[("penultimate", "logistic")])
    images = find_images([folder], predictor.classes)
    assert images.labelled is False  # a plain folder: no class folders
    batches = predict_batches(predictor, images, batch_size=4)
    items, pred, scores, bad = next(batches)
    assert len(items) == 4 and scores.shape == (4, 3) and not bad
    last = images.items[-1][0]
    open(last, "wb").write(b"truncated")
    rest = list(batches)
    assert [b for *_, bads in rest for b, _ in bads] == [last]
    assert sum(len(i) for i, *_ in rest) == 20 - 4 - 1


def test_finetuned_run_predicts_with_its_best_checkpoint(head_experiment, tmp_path):
    from featx.config import FinetuneConfig
    from featx.finetune import data_from_cache, finetune
    ex = head_experiment
    res = finetune(data_from_cache(ex.cache), FinetuneConfig(
        model="resnet18", weights=str(ex.weights), epochs=1, batch_size=16, image_size=32,
        precision="fp32", workers=0, out_dir=tmp_path / "ft", progress=False, freeze="layer3"))
    cache = Cache(ex.cache)
    manifest = tmp_path / "test.csv"
    items = cache.split_items("test")
    pd.DataFrame({"path": [str(ex.data / p) for p, _ in items],
                  "label": [cache.classes[y] for _, y in items]}).to_csv(manifest, index=False)
    out = tmp_path / "ft.csv"
    r = run("predict", "--finetuned", res.result_path, "--data", manifest, "--out", out,
            "--no-progress")
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    m = res.result["metrics"]
    assert f"accuracy {m['accuracy']:.4f}" in r.output  # the run's own test metrics
    assert (df["predicted"] == df["label"]).mean() == pytest.approx(m["accuracy"])
    # a best.pt from another epoch is not the checkpoint the result scored
    ckpt = torch.load(res.run_dir / "best.pt", weights_only=True)
    torch.save({**ckpt, "epoch": ckpt["epoch"] + 1}, res.run_dir / "best.pt")
    assert_one_line_error(run("predict", "--finetuned", res.result_path, "--data", manifest,
                       "--out", out), "sha256", "best.pt")
    # ... and with its sha256 recorded as well (the folder's writer edited the JSON too)
    record = json.loads(res.result_path.read_text())
    record["artifacts"]["model_sha256"] = file_sha256(res.run_dir / "best.pt")
    res.result_path.write_text(json.dumps(record))
    assert_one_line_error(run("predict", "--finetuned", res.result_path, "--data", manifest,
                       "--out", out), "not the checkpoint")
    # a pickle whose payload would create a file, as best.pt with its sha256 recorded:
    # weights_only refuses it and the payload never runs
    marker = tmp_path / "pwned"
    (res.run_dir / "best.pt").write_bytes(malicious_pickle(marker))
    record["artifacts"]["model_sha256"] = file_sha256(res.run_dir / "best.pt")
    res.result_path.write_text(json.dumps(record))
    for cmd in (["predict", "--finetuned", res.result_path, "--data", manifest, "--out", out],
                ["export", res.result_path, "--out", tmp_path / "ft.pt2"]):
        r = run(*cmd)
        assert r.exit_code != 0 and "Traceback" not in r.output, r.output
        assert len([ln for ln in r.output.splitlines() if ln.startswith("Error:")]) == 1
        assert not marker.exists()


def test_a_head_on_an_intermediate_layer_predicts_what_fit_heads_scored(head_experiment,
                                                                        tmp_path):
    """``extract --layers layer2 --pool 2`` then a head on ``layer2.pool2``: predict on the
    cache's own test images runs that layer (hooked, in torch) and gives the head's
    predictions and probabilities on the cached rows, hence the reported metrics."""
    from featx.config import ExtractConfig, HeadsConfig
    from featx.data import load_dataset
    from featx.extract import extract
    from featx.heads import fit_heads
    ex = head_experiment
    res = extract(load_dataset(ex.data), ExtractConfig(
        "resnet18", weights=str(ex.weights), pools=(2,), layers=("layer2",), image_size=32,
        workers=0, precision="fp32", out_dir=tmp_path / "cache", progress=False))
    fit = fit_heads([res.path], HeadsConfig(heads=("logistic",), features=("layer2.pool2",),
                                            out_dir=tmp_path / "results", jobs=1))
    result_path = fit.json_paths[0]
    cache = Cache(res.path)
    manifest = tmp_path / "test_manifest.csv"
    _test_manifest(cache, ex.data, manifest)
    out = tmp_path / "pred.csv"
    run_ = predict(result_path, [manifest], out, batch_size=4, progress=False)
    df = pd.read_csv(out)
    X = cache.load("test", "layer2.pool2")
    pipe = load_head(result_path)
    assert X.shape[1] == 128 * 4
    assert df["predicted"].tolist() == [cache.classes[k] for k in pipe.predict(X)]
    np.testing.assert_allclose(df.iloc[:, 3:].to_numpy(), class_scores(pipe, X, 3), atol=1e-5)
    assert run_.metrics["confusion_matrix"] == read_result(result_path)["metrics"][
        "confusion_matrix"]
    # an exported graph gives the last map only: naming an engine is one line, no file
    with pytest.raises(Exception) as err:
        load_predictor(result_path, engine="onnxruntime")
    assert "layer" in str(err.value) and "\n" not in str(err.value)
    # nor does featx export take it (yet): one line on the command line, nothing written
    res_cli = run("export", str(result_path), "--out", str(tmp_path / "h.pt2"))
    assert res_cli.exit_code != 0 and not (tmp_path / "h.pt2").exists()
    assert_one_line_error(res_cli, "intermediate layer")
