"""Fine-tuning: freezing, losses, the split, checkpoint choice, resume, outputs, bad input.

Everything runs on the CPU with random-init resnet18 on 32-64 px digit images, 1-3 epochs.
"""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import featx.finetune.run as ft
from featx.cache import Cache
from featx.cli import main
from featx.config import ExtractConfig
from featx.data import load_dataset
from featx.extract import extract
from featx.finetune import (
    build_model,
    data_from_cache,
    data_from_spec,
    finetune,
    list_stages,
    make_loss,
)
from featx.metrics import classification_metrics
from featx.results import make_result
from tests.builders import write_digits
from tests.builders import small_finetune_config as _cfg
from tests.builders import load_checkpoint as _load

CLASSES = ["digit0", "digit1", "digit2"]


def _data(root):
    return data_from_spec(load_dataset(root), workers=0)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.equal(a, b))


@pytest.fixture(scope="module")
def basic_run(tmp_path_factory):
    """One 3-epoch run shared by the tests that only read its outputs."""
    tmp = tmp_path_factory.mktemp("basic")
    data = _data(write_digits(tmp / "digits"))
    return finetune(data, _cfg(tmp / "results", epochs=3, augment=False))


def test_training_loss_decreases(basic_run):
    losses = [row["train_loss"] for row in basic_run.history]
    assert len(losses) == 3
    assert losses[-1] < losses[0]


def test_outputs_history_curves_and_checkpoints(basic_run):
    d = basic_run.run_dir
    assert d.name.startswith("digits_resnet18_finetune_none-none-ce-pool1-")
    for name in ("best.pt", "last.pt", "history.csv", "curves.png", "result.json"):
        assert (d / name).is_file(), name
    with open(d / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                             "epoch_s"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    last = _load(d / "last.pt")
    for key in ("model", "optimizer", "scheduler", "epoch", "config", "rng", "best", "history"):
        assert key in last
    assert last["epoch"] == 3 and last["config"]["model"] == "resnet18"
    best = _load(d / "best.pt")
    assert best["epoch"] == basic_run.best_epoch
    # the best epoch is the one with the lowest val loss
    val = [row["val_loss"] for row in basic_run.history]
    assert basic_run.best_epoch == int(np.argmin(val)) + 1


def test_result_json_has_the_heads_schema_and_metrics(basic_run):
    result = json.loads(basic_run.result_path.read_text())
    head = make_result(kind="head", method="x", dataset=result["dataset"], model="resnet18",
                       metrics={}, timings={})
    assert set(result) == set(head)
    assert result["kind"] == "finetune"
    assert result["method"] == "finetune freeze=none loss=ce pool=1"
    reference = classification_metrics([0, 1, 2], [0, 1, 1], np.eye(3), CLASSES)
    assert set(reference) <= set(result["metrics"])
    assert result["metrics"]["n"] == basic_run.result["dataset"]["counts"]["test"]
    for key in ("total_s", "per_epoch_s", "fit_s", "predict_s"):
        assert result["timings"][key] >= 0
    assert {"total_s", "per_epoch_s"} <= set(result["metrics"])
    assert result["selection"]["criterion"] == "val_loss"
    assert result["selection"]["best_epoch"] == basic_run.best_epoch
    for key in ("epochs", "lr", "freeze", "loss", "pool", "optimizer", "scheduler", "seed"):
        assert key in result["settings"]


def test_freeze_backbone_keeps_every_backbone_tensor_bit_identical(digits_dir, tmp_path):
    before = build_model("resnet18", "none", 3, freeze="backbone").state_dict()
    res = finetune(_data(digits_dir), _cfg(tmp_path, epochs=1, freeze="backbone", lr=1e-2))
    after = _load(res.run_dir / "best.pt")["model"]
    backbone = [k for k in before if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)
    assert all(_same(before[k], after[k]) for k in backbone)
    assert not _same(before["head.weight"], after["head.weight"])
    groups = _load(res.run_dir / "last.pt")["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["head"]
    assert res.result["settings"]["trainable_params"] == 512 * 3 + 3


def test_freeze_stage_freezes_up_to_and_including_it(digits_dir, tmp_path):
    before = build_model("resnet18", "none", 3, freeze="layer3").state_dict()
    res = finetune(_data(digits_dir), _cfg(tmp_path, epochs=1, freeze="layer3", lr=1e-2))
    after = _load(res.run_dir / "best.pt")["model"]
    frozen = ("backbone.conv1.", "backbone.bn1.", "backbone.layer1.", "backbone.layer2.",
              "backbone.layer3.")
    for k in before:
        if k.startswith(frozen):
            assert _same(before[k], after[k]), k
    for k in ("backbone.layer4.1.conv2.weight", "backbone.layer4.1.bn2.running_mean",
              "backbone.layer4.1.bn2.weight", "head.weight"):
        assert not _same(before[k], after[k]), k
    groups = _load(res.run_dir / "last.pt")["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["head", "backbone"]
    # initial_lr: after the one cosine epoch both current lrs are 0, whatever the ratio
    assert groups[0]["initial_lr"] == pytest.approx(1e-2)
    assert groups[1]["initial_lr"] == pytest.approx(1e-3)


def test_frozen_modules_stay_in_eval_mode_during_training():
    model = build_model("resnet18", "none", 3, freeze="layer2").train()
    assert not model.backbone.layer2.training and not model.backbone.bn1.training
    assert model.backbone.layer3.training and model.head.training


def test_focal_loss_with_gamma_0_is_cross_entropy_and_weighted_uses_train_counts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (32,), generator=g)
    focal = make_loss("focal", gamma=0.0)(logits, target)
    ce = F.cross_entropy(logits, target)
    torch.testing.assert_close(focal, ce)
    (gf,) = torch.autograd.grad(focal, logits)
    (gc,) = torch.autograd.grad(ce, logits)
    torch.testing.assert_close(gf, gc)
    # gamma > 0: the definition, computed independently in float64 numpy
    z = logits.detach().double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p_t = (p / p.sum(1, keepdims=True))[np.arange(32), target.numpy()]
    for gamma in (0.5, 2.0, 5.0):
        expected = np.mean(-((1 - p_t) ** gamma) * np.log(p_t))
        got = make_loss("focal", gamma=gamma)(logits, target).item()
        assert got == pytest.approx(expected, rel=1e-5), gamma
    weighted = make_loss("weighted", class_counts=[10, 30, 0, 20])
    torch.testing.assert_close(weighted.weight, torch.tensor([2.0, 2 / 3, 0.0, 1.0]))


def test_pool_2_head_reads_c_times_4_features_and_trains(digits_dir, tmp_path):
    model = build_model("resnet18", "none", 3, pool=2)
    assert model.head.in_features == 512 * 4
    assert model(torch.zeros(2, 3, 48, 48)).shape == (2, 3)
    # 48 px gives resnet18 a 2x2 last map, so pool 2 is a real 2x2 average
    res = finetune(_data(digits_dir), _cfg(tmp_path, epochs=1, pool=2, image_size=48))
    assert res.result["feature"] == "pool2"
    assert res.result["method"].endswith("pool=2")
    assert _load(res.run_dir / "best.pt")["model"]["head.weight"].shape == (3, 2048)


def test_imagenet_weights_from_the_hub_cache_are_used(mobilenet_in_hub, digits_dir, tmp_path):
    res = finetune(_data(digits_dir), _cfg(tmp_path, model="mobilenet_v2", weights="imagenet",
                                           freeze="backbone", epochs=1, lr=1e-2))
    prov = res.result["provenance"]
    assert prov["weights_kind"] == "imagenet" and mobilenet_in_hub.name in prov["weights_source"]
    assert res.run_dir.name.startswith("digits_mobilenet_v2_finetune_imagenet-backbone-")
    assert res.result["settings"]["trainable_params"] == 1280 * 3 + 3


def test_split_from_uses_exactly_the_cache_files(digits_dir, tmp_path):
    (digits_dir / "digit1" / "broken.png").write_bytes(b"not an image")
    ex = extract(load_dataset(digits_dir), ExtractConfig(
        model="resnet18", weights="none", image_size=32, workers=0, out_dir=tmp_path / "cache",
        progress=False))
    cache = Cache(ex.path)
    data = data_from_cache(ex.path)
    assert data.splits == {s: cache.split_items(s) for s in cache.splits}
    assert all("broken.png" not in p for items in data.splits.values() for p, _ in items)
    # --data on the same folder skips the same file and gets the same fingerprints
    direct = _data(digits_dir)
    assert direct.splits == data.splits
    assert [s[1] for s in direct.skipped] == ["digit1/broken.png"]
    info = cache.dataset_info()
    for key in ("fingerprint", "split_fingerprint", "test_fingerprint", "counts", "classes"):
        assert direct.info[key] == info[key], key

    r = CliRunner().invoke(main, ["finetune", "--model", "resnet18", "--weights", "none",
                                  "--split-from", str(ex.path), "--epochs", "1",
                                  "--image-size", "32", "--workers", "0", "--no-progress",
                                  "--out", str(tmp_path / "results")])
    assert r.exit_code == 0, r.output
    result = json.loads(open(r.output.strip().splitlines()[-1]).read())
    assert result["dataset"] == json.loads(json.dumps(info))
    assert result["metrics"]["n"] == len(cache.split_items("test"))


def test_test_split_never_influences_the_checkpoint_choice(digits_dir, tmp_path):
    data = _data(digits_dir)
    relabelled = dataclasses.replace(data, splits={
        **data.splits, "test": [(p, 0) for p, _ in data.splits["test"]]})
    a = finetune(data, _cfg(tmp_path / "a", epochs=2))
    b = finetune(relabelled, _cfg(tmp_path / "b", epochs=2))
    drop = lambda h: [{k: v for k, v in row.items() if k != "epoch_s"} for row in h]  # noqa
    assert drop(a.history) == drop(b.history)
    assert a.best_epoch == b.best_epoch
    wa, wb = _load(a.run_dir / "best.pt")["model"], _load(b.run_dir / "best.pt")["model"]
    assert all(_same(wa[k], wb[k]) for k in wa)
    # ... while the test labels do reach the metrics
    assert a.result["metrics"]["confusion_matrix"] != b.result["metrics"]["confusion_matrix"]


def test_early_stop_watches_val_loss_and_scores_the_best_epoch(digits_dir, tmp_path,
                                                              monkeypatch):
    val_losses = iter([1.0, 0.5, 0.7, 0.6, 0.4, 0.3])
    real_evaluate = ft.evaluate

    def scripted(model, criterion, loader, *args):
        out = real_evaluate(model, criterion, loader, *args)
        if loader.dataset.items is data.splits["val"]:
            out["loss"] = next(val_losses)
        return out

    data = _data(digits_dir)
    monkeypatch.setattr(ft, "evaluate", scripted)
    res = finetune(data, _cfg(tmp_path, epochs=6, early_stop=2, image_size=16))
    assert [row["val_loss"] for row in res.history] == [1.0, 0.5, 0.7, 0.6]
    assert res.stopped_early and res.best_epoch == 2
    assert _load(res.run_dir / "best.pt")["epoch"] == 2
    assert res.result["selection"]["best_val_loss"] == 0.5
    assert res.result["selection"]["stopped_early"] is True


def test_resume_ends_like_an_uninterrupted_run(digits_dir, tmp_path):
    data = _data(digits_dir)
    # 4 epochs cut after 2: epoch 4's lr comes from the restored cosine schedule (epoch 3's
    # is in the optimizer state alone)
    kw = dict(epochs=4, optimizer="sgd", lr=0.05, scheduler="cosine", augment=True)
    full = finetune(data, _cfg(tmp_path / "full", **kw))

    def stop_after_2(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, _cfg(tmp_path / "cut", **kw), on_epoch_end=stop_after_2)
    run_dir = tmp_path / "cut" / full.run_dir.name
    assert _load(run_dir / "last.pt")["epoch"] == 2
    assert not (run_dir / "result.json").exists()
    resumed = finetune(data, _cfg(tmp_path / "cut", resume=True, **kw))
    assert resumed.resumed and len(resumed.history) == 4
    for r0, r1 in zip(full.history, resumed.history):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert r1[key] == pytest.approx(r0[key], rel=1e-5, abs=1e-6), (r0["epoch"], key)
    assert resumed.best_epoch == full.best_epoch
    wa, wb = _load(full.run_dir / "best.pt")["model"], _load(run_dir / "best.pt")["model"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert resumed.result["metrics"]["accuracy"] == full.result["metrics"]["accuracy"]
    assert resumed.result["metrics"]["roc_auc"] == pytest.approx(full.result["metrics"]["roc_auc"])


def test_interrupted_checkpoint_write_leaves_the_previous_best_intact(digits_dir, tmp_path,
                                                                      monkeypatch):
    data = _data(digits_dir)
    real_save, calls = torch.save, []

    def dies_on_third_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 3:  # epoch 1 wrote best.pt and last.pt; epoch 2 dies mid-write
            f.write(b"half a checkpoint")  # featx saves through a file object
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ft.torch, "save", dies_on_third_save)
    with pytest.raises(KeyboardInterrupt):
        finetune(data, _cfg(tmp_path, epochs=2))
    monkeypatch.undo()
    run_dir = next(tmp_path.glob("digits_*"))
    assert _load(run_dir / "best.pt")["epoch"] == 1
    assert _load(run_dir / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "history.csv", "last.pt"]


def test_cli_interrupt_says_how_to_resume_and_resume_finishes(digits_dir, tmp_path,
                                                              monkeypatch):
    real_train, calls = ft.train_one_epoch, []

    def interrupted_in_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    args = ["finetune", "--model", "resnet18", "--weights", "none", "--data", str(digits_dir),
            "--image-size", "16", "--workers", "0", "--epochs", "2", "--no-progress",
            "--out", str(tmp_path)]
    monkeypatch.setattr(ft, "train_one_epoch", interrupted_in_epoch_2)
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "Error: interrupted" in r.output and "--resume" in r.output
    monkeypatch.undo()
    r = CliRunner().invoke(main, args + ["--resume"])
    assert r.exit_code == 0, r.output
    assert "resuming" in r.output
    result = json.loads(open(r.output.strip().splitlines()[-1]).read())
    assert result["selection"]["epochs_run"] == 2 and result["selection"]["resumed"]


def test_list_stages_prints_the_valid_freeze_values():
    r = CliRunner().invoke(main, ["finetune", "--model", "vgg16", "--list-stages"])
    assert r.exit_code == 0
    lines = r.output.split()
    assert lines[:2] == ["none", "backbone"] and "features.30" in lines
    assert list_stages("resnet50")[2:] == ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("args, expected", [
    # the ranges declared in featx.config, as click types (the library's own messages for
    # these: tests/test_params.py)
    (["--epochs", "0"], "'--epochs' (env var: 'FEATX_EPOCHS'): 0 is not in the range x>=1."),
    (["--epochs", "-2"], "'--epochs' (env var: 'FEATX_EPOCHS'): -2 is not in the range x>=1."),
    (["--lr", "0"], "'--lr' (env var: 'FEATX_LR'): 0.0 is not in the range x>0."),
    (["--lr", "-1e-3"], "'--lr' (env var: 'FEATX_LR'): -0.001 is not in the range x>0."),
    (["--batch-size", "0"], "'--batch-size' (env var: 'FEATX_BATCH_SIZE'): 0 is not in the "
     "range x>=1."),
    (["--freeze", "layer9"], "layer4"),
    (["--model", "resnet81"], "resnet18"),
    (["--split", "1,0,0", "--early-stop", "3"], "needs a val split"),
    (["--split-from", "MOVED"], "no longer exists"),
    ([], "exactly one of --data"),
])
def test_bad_input_gives_one_line(digits_dir, tmp_path, args, expected):
    if "MOVED" in args:
        ex = extract(load_dataset(digits_dir), ExtractConfig(
            model="resnet18", weights="none", image_size=16, workers=0,
            out_dir=tmp_path / "cache", progress=False))
        digits_dir.rename(tmp_path / "elsewhere")
        args = ["--split-from", str(ex.path)]
    elif args:  # every other case but the last reads the digits
        args = args + ["--data", str(digits_dir)]
    base = ["finetune", "--model", "resnet18", "--weights", "none", "--image-size", "32",
            "--workers", "0", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, base + args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and expected in errors[0], r.output
    assert not list((tmp_path / "r").glob("*/result.json"))


def test_result_carries_intervals_and_per_image_outputs_of_the_test_list(basic_run):
    from featx.artifacts import artifact_file
    from featx.results import read_image_outputs
    result = json.loads(basic_run.result_path.read_text())
    m = result["metrics"]
    assert m["intervals"]["bootstrap"]["n_boot"] == 1000
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "brier"):
        lo, hi = m["intervals"][key]
        assert lo <= m[key] <= hi, key
    assert m["score_kind"] == "probability" and 0 <= m["ece"] <= 1
    path = artifact_file(basic_run.result_path, result, "test_outputs")  # sha256 checked
    out = read_image_outputs(path, result)
    split = load_dataset(basic_run.result["dataset"]["root"]).splits["test"]
    assert out["paths"] == [p for p, _ in split]  # keyed by the test file list, in its order
    again = classification_metrics(out["y_true"], out["y_pred"], out["scores"], CLASSES)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc"):
        # the same float64 numbers: the CSV holds repr() floats
        assert again[key] == pytest.approx(m[key], abs=1e-12), key
