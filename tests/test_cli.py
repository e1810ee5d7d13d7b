"""The `featx` command: help everywhere, one clear line for each bad input."""
from __future__ import annotations

import errno

import h5py
import numpy as np
import pytest
import torch

from featx.runtime import resolve_precision
from tests.builders import assert_one_line_error
from tests.builders import invoke_cli as run

EXTRACT = ["extract", "--model", "resnet18", "--weights", "none", "--image-size", "32",
           "--workers", "0", "--no-progress"]


def test_every_command_has_help():
    for cmd in ([], ["extract"], ["info"], ["models"], ["weights"], ["weights", "import"],
                ["fit-heads"], ["finetune"], ["report"], ["compare"], ["demo"]):
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output, cmd


def test_models_lists_sizes_and_weight_availability(mobilenet_in_hub):
    r = run("models")
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if ln.startswith("mobilenet_v2 "))
    assert line.split()[1:4] == ["1280", "1280", "224"] and "available (IMAGENET1K_V1)" in line
    vgg = next(ln for ln in r.output.splitlines() if ln.startswith("vgg16 "))
    assert vgg.split()[1:3] == ["4096", "512"] and "missing (vgg16-397923af.pth)" in vgg


def test_extract_then_info(digits_dir, tmp_path):
    r = run(*EXTRACT, "--data", digits_dir, "--pool", "1,2", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    path = r.stdout.strip().splitlines()[-1]
    assert path.endswith("digits_resnet18_none_32.h5")
    used = resolve_precision("auto", torch.device("cpu"))  # bf16 only on native-bf16 CPUs
    assert f"images/s, {used}), weights: random init" in r.output
    info = run("info", path)
    assert info.exit_code == 0
    for needle in ("complete: True", "train: 66 images", "pool2: shape (66, 2048), float32",
                   "weights_source: random init", "skipped files: 0", f"precision: {used}"):
        assert needle in info.output, needle
    again = run(*EXTRACT, "--data", digits_dir, "--pool", "1,2", "--out", tmp_path)
    assert again.exit_code == 0 and "up to date, nothing to do" in again.output


def test_environment_variables_set_options(digits_dir, tmp_path):
    r = run("extract", "--data", digits_dir, "--no-progress",
            env={"FEATX_MODELS": "resnet18", "FEATX_WEIGHTS": "none", "FEATX_IMAGE_SIZE": "32",
                 "FEATX_WORKERS": "0", "FEATX_PRECISION": "fp32",
                 "FEATX_OUT": str(tmp_path / "envout")})
    assert r.exit_code == 0, r.output
    assert "images/s, fp32)" in r.output
    assert (tmp_path / "envout" / "digits_resnet18_none_32.h5").exists()


def test_unknown_model_suggests_names(digits_dir):
    assert_one_line_error(run("extract", "--model", "resnet81", "--data", digits_dir),
                          "unknown model 'resnet81'", "resnet18", "featx models")


def test_missing_weights_offline(digits_dir, tmp_path):
    assert_one_line_error(run("extract", "--model", "resnet50", "--data", digits_dir,
                              "--out", tmp_path), "resnet50-11ad3fa6.pth", "--weights none")


def test_stale_cache_refused_in_one_line(digits_dir, tmp_path):
    assert run(*EXTRACT, "--data", digits_dir, "--out", tmp_path).exit_code == 0
    assert_one_line_error(run(*EXTRACT, "--data", digits_dir, "--pool", "4", "--out", tmp_path),
                          "pools", "--overwrite")


def test_info_on_foreign_and_partial_files(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["a"] = np.arange(3)
    assert_one_line_error(run("info", tmp_path / "x.h5"), "not a featx cache")
    (tmp_path / "y.h5.partial").write_text("")
    assert_one_line_error(run("info", tmp_path / "y.h5.partial"), "unfinished extraction")
    assert_one_line_error(run("info", tmp_path / "none.h5"), "no such cache file")


def test_data_problems_are_one_line(tmp_path, digits_dir):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run(*EXTRACT, "--data", tmp_path / "empty"), "no class folders")
    assert_one_line_error(run(*EXTRACT, "--data", digits_dir, "--split", "0.9,0.2,0.1"),
                          "sum to 1")
    assert_one_line_error(run(*EXTRACT, "--data", digits_dir, "--pool", "0,2"), "--pool")


def test_weights_import_checks_the_file(tmp_path):
    import torch
    from torchvision import models
    bad = tmp_path / "w.pth"
    torch.save(models.resnet34().state_dict(), bad)
    assert_one_line_error(run("weights", "import", bad, "--model", "resnet18"),
                          "does not fit resnet18")


def test_interrupt_and_full_disk_are_one_line(digits_dir, tmp_path, monkeypatch):
    import featx.cache.writer as ex

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex.CacheWriter, "append", interrupted)
    assert_one_line_error(run(*EXTRACT, "--data", digits_dir, "--out", tmp_path),
                          "interrupted", "resume")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ex.CacheWriter, "append", full)
    assert_one_line_error(run(*EXTRACT, "--data", digits_dir, "--out", tmp_path),
                          "disk is full")


def test_corrupt_files_are_reported_after_the_run(digits_dir, tmp_path):
    (digits_dir / "digit2" / "oops.png").write_text("text")
    r = run(*EXTRACT, "--data", digits_dir, "--out", tmp_path)
    assert r.exit_code == 0
    assert "skipped 1 unreadable file(s)" in r.output and "oops.png" in r.output


@pytest.mark.parametrize("command", [["extract", "--model", "resnet18"],
                                     ["finetune", "--model", "resnet18"],
                                     ["compare", "--models", "resnet18"],
                                     ["fit-heads", "x.h5"]])
@pytest.mark.parametrize("seed", ["-1", str(2**32), "10" * 20])
def test_seed_out_of_range_is_one_line_naming_option_and_range(digits_dir, command, seed):
    data = [] if command[0] == "fit-heads" else ["--data", digits_dir]
    assert_one_line_error(run(*command, *data, "--seed", seed), "'--seed'", seed,
                          "0<=x<=4294967295")


def test_negative_workers_is_one_line(digits_dir):
    assert_one_line_error(run(*EXTRACT[:-3], "--data", digits_dir, "--workers", "-1"),
                          "'--workers'", "-1")


def test_too_many_workers_capped_and_pool_beyond_the_map_noted(digits_dir, tmp_path,
                                                                monkeypatch):
    import featx.runtime
    monkeypatch.setattr(featx.runtime, "_usable_cores", lambda: 1)
    # resnet18's last map is 1x1 at 32 px, 2x2 at 64 px
    r = run(*EXTRACT[:-3], "--workers", "64", "--no-progress", "--data", digits_dir,
            "--pool", "1,2,4", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "note: --workers 64 is more than the 1 CPU core(s) here; using 1." in r.output
    assert "note: --pool 2,4 is larger than resnet18's last spatial map at 32 px (1x1)" \
        in r.output
    from featx.backbones import pool_notes
    assert pool_notes((2, 2), 64, (1, 2), "resnet18") == []
    assert "--pool 3 is larger" in pool_notes((2, 2), 64, (1, 2, 3), "resnet18")[0]


def test_no_readable_train_image_is_refused_and_writes_no_cache(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.png").write_text("not an image")
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n"
                                                             for i in range(4)))
    out = tmp_path / "cache"
    assert_one_line_error(run(*EXTRACT, "--split", "1,0,0", "--data", tmp_path / "m.csv",
                              "--out", out),
                          "none of the 4 image(s) of the train split could be read",
                          "0.png: UnidentifiedImageError", "no cache was written")
    assert not list(out.glob("*"))
