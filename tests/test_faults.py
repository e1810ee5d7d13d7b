"""What featx survives: a full disk, a read-only folder, two runs on one cache, images gone
from under a cache, damaged files. Each case: one line through the CLI, earlier results
byte-for-byte untouched, and the next run resumes or starts cleanly by itself.

Full disks and read-only folders are real file systems (a small tmpfs, mounted for the
test), because h5py's behaviour on ENOSPC is what breaks; where mounting is not permitted
the test skips (read-only falls back to chmod 0o555 when not running as root).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featx.cache import Cache, CacheError, CacheWriter, lock_path, partial_path
from tests.builders import h5_datasets as _datasets
from tests.builders import invoke_cli, write_digits

REPO = Path(__file__).resolve().parents[1]
EXTRACT = ["extract", "--model", "resnet18", "--weights", "none", "--image-size", "48",
           "--batch-size", "8", "--workers", "0", "--precision", "fp32", "--no-progress"]
NAME = "d_resnet18_none_48.h5"


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cli(args, **kw):
    res = invoke_cli(*args, **kw)
    return res, res.output  # click 8.2+: stdout and stderr interleaved


def _one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "featx.cli", *map(str, args)], env=_env(),
                          capture_output=True, text=True, **kw)



def _mount_tmpfs(where: Path, size: str, *, ro: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                       capture_output=True)
    return r.returncode == 0


def _remount(where: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs of a few MB; yields a function ``resize("64m")``."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "2m"):
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder no command may write into: a read-only tmpfs, or chmod 0o555 for non-root."""
    ro = tmp_path / "ro"
    if _mount_tmpfs(ro, "1m", ro=True):
        try:
            yield ro
        finally:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)
        return
    if os.geteuid() == 0:
        pytest.skip("no read-only mount permitted, and root ignores chmod")
    ro.mkdir(exist_ok=True)
    ro.chmod(0o555)
    yield ro
    ro.chmod(0o755)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("faults") / "d", per_class=30, size=32)


EXTRACT32 = EXTRACT[:5] + ["--image-size", "32", *EXTRACT[7:]]


@pytest.fixture(scope="module")
def cache32(digits, tmp_path_factory) -> Path:
    """A complete cache of ``digits`` (penultimate only, 32 px), made once; copy, don't edit."""
    out = tmp_path_factory.mktemp("cache32")
    res, _ = _cli(EXTRACT32 + ["--data", digits, "--out", out])
    assert res.exit_code == 0, res.output
    return out / "d_resnet18_none_32.h5"


# --- a full disk ------------------------------------------------------------------------------

def test_full_disk_during_extract_is_one_line_and_the_rerun_resumes(small_disk, digits):
    """8 MB: the earlier cache fits, the bigger one does not. The run stops with one line
    before HDF5 meets the full disk, the old cache is untouched, and once there is space the
    same command resumes and ends with every row (penultimate equal to the old cache's: same
    seeded weights, same images)."""
    _remount(small_disk, "8m")
    res, _ = _cli(EXTRACT + ["--data", digits, "--out", small_disk])
    assert res.exit_code == 0, res.output
    old = small_disk / NAME
    before = _digest(old)
    expect = {s: Cache(old).load(s, "penultimate") for s in ("train", "val", "test")}
    bigger = EXTRACT + ["--data", digits, "--pool", "1,2,4", "--overwrite"]
    res, text = _cli(bigger + ["--out", small_disk])
    line = _one_error_line(text)
    assert res.exit_code == 1 and "the disk is full" in line and "resume" in line
    assert _digest(old) == before and Cache(old).attrs["pools"] == []
    assert partial_path(old).exists() and not lock_path(old).exists()
    _remount(small_disk, "64m")
    res, text = _cli(bigger + ["--out", small_disk])
    assert res.exit_code == 0 and "[resumed]" in text, text
    cache = Cache(old)
    assert cache.attrs["pools"] == [1, 2, 4]
    for split, pen in expect.items():
        np.testing.assert_array_equal(cache.load(split, "penultimate"), pen)
        np.testing.assert_allclose(cache.load(split, "pool1"), pen, rtol=1e-5, atol=1e-6)


def test_hdf5_running_out_of_space_is_one_line_and_the_next_run_starts_cleanly(small_disk,
                                                                                digits,
                                                                                cache32):
    """The per-batch space check turned off, so h5py itself meets ENOSPC (which it reports
    as a RuntimeError, and then segfaults on close). In a subprocess, so a crash fails the
    test instead of killing pytest."""
    _remount(small_disk, "6m")  # the earlier cache takes 3.5 MB (1 MiB chunks)
    old = small_disk / cache32.name  # an earlier cache on that disk
    old.write_bytes(cache32.read_bytes())
    before = _digest(old)
    code = ("import sys, featx.cache.writer as c; c.free_bytes = lambda folder: 1 << 40; "
            "from featx.cli import main; sys.argv = ['featx'] + sys.argv[1:]; main()")
    args = [*EXTRACT, "--data", digits, "--pool", "1,2,4", "--out", small_disk]
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], env=_env(),
                       capture_output=True, text=True)
    line = _one_error_line(r.stderr)
    assert r.returncode == 1 and "the disk is full" in line, r.stderr[-2000:]
    assert "No space left" not in r.stderr and "Segmentation" not in r.stderr
    assert _digest(old) == before
    assert not partial_path(small_disk / NAME).exists()  # removed: it cannot be trusted
    _remount(small_disk, "64m")
    r = _run(args)
    assert r.returncode == 0, r.stderr
    assert Cache(small_disk / NAME).attrs["pools"] == [1, 2, 4]


def test_an_unreadable_partial_is_started_afresh_with_a_note(digits, cache32, tmp_path):
    partial = partial_path(tmp_path / cache32.name)
    partial.write_bytes(cache32.read_bytes()[: cache32.stat().st_size // 3])  # a torn write
    res, text = _cli(EXTRACT32 + ["--data", digits, "--out", tmp_path])
    assert res.exit_code == 0 and "starting it afresh" in text, text
    a, b = _datasets(cache32), _datasets(tmp_path / cache32.name)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_full_disk_during_finetune_is_one_line_and_keeps_earlier_results(small_disk, cache32):
    _remount(small_disk, "4m")  # a resnet18 checkpoint is ~45 MB
    earlier = small_disk / "earlier" / "result.json"
    earlier.parent.mkdir()
    earlier.write_text('{"schema": "featx-result/1"}')
    res, text = _cli(["finetune", "--model", "resnet18", "--weights", "none", "--split-from",
                      cache32, "--image-size", "32", "--epochs", "1",
                      "--workers", "0", "--no-progress", "--out", small_disk])
    line = _one_error_line(text)
    assert res.exit_code == 1 and "the disk is full" in line and "--resume" in line
    assert earlier.read_text() == '{"schema": "featx-result/1"}'
    assert not list(small_disk.rglob("*.tmp"))


# --- a read-only folder -------------------------------------------------------------------

def test_read_only_out_cwd_or_torch_home_is_one_line_in_every_command(read_only_dir, digits,
                                                                      cache32, tmp_path,
                                                                      monkeypatch):
    cache = cache32
    before = _digest(cache)
    wfile = tmp_path / "w.pth"
    from torchvision import models
    torch.save(models.shufflenet_v2_x1_0().state_dict(), wfile)  # 9 MB, the smallest here
    ro = read_only_dir
    from tests.builders import TILES
    from tests.builders import dataset_record as _dataset
    from tests.builders import write_head_result as _head
    results = tmp_path / "results"
    _head(results, _dataset("tiles", TILES), "penultimate", "logistic", [2, 2, 2])
    commands = {
        "extract": EXTRACT32 + ["--data", digits, "--out", ro / "cache"],
        "fit-heads": ["fit-heads", cache, "--heads", "logistic", "--jobs", "1", "--out", ro],
        "finetune": ["finetune", "--model", "resnet18", "--weights", "none", "--split-from",
                     cache, "--epochs", "1", "--workers", "0", "--out", ro],
        "report": ["report", results, "--out", ro / "report"],
        "compare": ["compare", "--data", digits, "--models", "resnet18", "--weights", "none",
                    "--finetune", "none", "--cache-dir", ro, "--out", tmp_path / "r"],
        "demo": ["demo", "--quick", "--cache-dir", ro, "--out", tmp_path / "demo"],
    }
    for name, args in commands.items():
        res, text = _cli(args)
        line = _one_error_line(text)
        assert res.exit_code == 1 and str(ro) in line, (name, text)
        assert "cannot write" in line or "permission denied" in line, (name, text)
    # the current folder: the default --out is cache/ there
    monkeypatch.chdir(ro)
    res, text = _cli(EXTRACT32 + ["--data", digits])
    assert res.exit_code == 1 and str(ro) in _one_error_line(text)
    monkeypatch.chdir(tmp_path)
    # TORCH_HOME: where `weights import` puts a file
    monkeypatch.setenv("TORCH_HOME", str(ro))
    res, text = _cli(["weights", "import", wfile, "--model", "shufflenet_v2_x1_0"])
    assert res.exit_code == 1 and "TORCH_HOME" in _one_error_line(text), text
    assert _digest(cache) == before


# --- two runs, one cache ------------------------------------------------------------------

def test_a_second_run_on_the_same_cache_refuses_naming_the_first(tmp_path):
    """A real `featx extract` process holds the cache; a second run (this process) refuses
    with one line naming its pid, and the first run finishes a complete file."""
    root = write_digits(tmp_path / "d", per_class=20, size=32)
    out = tmp_path / "c"
    args = [*EXTRACT[:5], "--image-size", "64", "--batch-size", "4", *EXTRACT[9:],
            "--data", root, "--out", out]
    # the first run holds the lock until the second has been refused (a hook, not a timer)
    release = tmp_path / "release"
    lock = lock_path(out / "d_resnet18_none_64.h5")
    proc = subprocess.Popen([sys.executable, "-m", "featx.cli", *map(str, args)],
                            env={**_env(), "FEATX_TEST_HOLD_LOCK_UNTIL": str(release)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    partial = partial_path(out / "d_resnet18_none_64.h5")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if lock.is_file() and f"pid {proc.pid}" in lock.read_text():
            break
        time.sleep(0.05)
    try:
        assert proc.poll() is None, proc.stderr.read()
        res, text = _cli(args)
        assert proc.poll() is None, "the first run ended before the second started"
    finally:
        release.touch()
        rc = proc.wait(timeout=120)
    line = _one_error_line(text)
    assert res.exit_code == 1 and f"pid {proc.pid}" in line, text
    assert rc == 0, proc.stderr.read()
    cache = Cache(out / "d_resnet18_none_64.h5")
    assert sum(len(cache.labels(s)) for s in cache.splits) == 60
    assert not partial.exists() and not lock_path(out / "d_resnet18_none_64.h5").exists()


def test_an_incomplete_file_never_gets_the_final_name(tmp_path):
    path = tmp_path / "x.h5"
    splits = {"train": [("a.png", 0), ("b.png", 1)]}
    w = CacheWriter(path, {"model": "m"}, splits, {"penultimate": 3})
    w.append("train", 1, {"penultimate": np.ones((1, 3), np.float32)}, np.array([0]),
             ["a.png"], [])
    with pytest.raises(CacheError, match="1 of 2 files done"):
        w.finish({})
    w.close()
    assert not path.exists() and partial_path(path).exists()


# --- images gone, files damaged -------------------------------------------------------------

def test_split_from_a_cache_whose_images_are_gone(tmp_path):
    root = write_digits(tmp_path / "d", per_class=20, size=32)
    res, _ = _cli(EXTRACT[:5] + ["--image-size", "32", *EXTRACT[7:], "--data", root,
                                 "--out", tmp_path / "c"])
    cache = tmp_path / "c" / "d_resnet18_none_32.h5"
    res, _ = _cli(["fit-heads", cache, "--heads", "logistic,linear", "--jobs", "1",
                   "--out", tmp_path / "r"])
    assert res.exit_code == 0, res.output
    gone = Cache(cache).paths("test")[:2]
    for rel in gone:
        (root / rel).unlink()
    ft = ["finetune", "--model", "resnet18", "--weights", "none", "--split-from", cache,
          "--image-size", "32", "--epochs", "1", "--workers", "0", "--no-progress",
          "--out", tmp_path / "r"]
    res, text = _cli(ft)
    line = _one_error_line(text)
    assert res.exit_code == 1 and gone[0] in line and "--allow-missing" in line
    res, text = _cli(ft + ["--allow-missing"])
    assert res.exit_code == 0, text
    result = json.loads(Path(res.stdout.strip().splitlines()[-1]).read_text())
    info = Cache(cache).dataset_info()
    assert result["dataset"]["counts"]["test"] == info["counts"]["test"] - 2
    assert result["dataset"]["test_fingerprint"] != info["test_fingerprint"]
    res, _ = _cli(["report", tmp_path / "r"])
    rows = list(csv.DictReader(open(tmp_path / "r" / "report" / "report.csv")))
    assert {r["comparable"] for r in rows if r["kind"] == "head"} == {"True"}
    (ft_row,) = [r for r in rows if r["kind"] == "finetune"]
    assert ft_row["comparable"] == "False" and ft_row["reason"] == "test set differs"


@pytest.mark.parametrize("damage", ["attribute", "dataset"])
def test_a_cache_missing_a_key_is_one_line_naming_it(cache32, tmp_path, damage):
    path = tmp_path / cache32.name
    path.write_bytes(cache32.read_bytes())
    with h5py.File(path, "r+") as f:
        if damage == "attribute":
            del f.attrs["classes"]
        else:
            del f["val/labels"]
    key = "'classes'" if damage == "attribute" else "'val/labels'"
    for args in (["info", path], ["fit-heads", path, "--heads", "logistic", "--out", tmp_path]):
        res, text = _cli(args)
        line = _one_error_line(text)
        assert res.exit_code == 1 and key in line and str(path) in line, text


def test_a_damaged_last_pt_on_resume_is_one_line_and_starts_afresh_only_without_resume(
        cache32, tmp_path):
    ft = ["finetune", "--model", "resnet18", "--weights", "none", "--split-from", cache32,
          "--image-size", "32", "--epochs", "1", "--workers", "0", "--no-progress",
          "--out", tmp_path]
    res, _ = _cli(ft)
    assert res.exit_code == 0, res.output
    run = Path(res.stdout.strip().splitlines()[-1]).parent
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    best = _digest(run / "best.pt")
    res, text = _cli(ft + ["--resume"])
    line = _one_error_line(text)
    assert res.exit_code == 1 and "last.pt" in line and "without --resume" in line
    assert _digest(run / "best.pt") == best


def test_a_result_with_a_non_numeric_time_is_listed_as_unreadable_not_ranked(tmp_path):
    from tests.builders import TILES
    from tests.builders import dataset_record as _dataset
    from tests.builders import write_head_result as _head
    ds = _dataset("tiles", TILES)
    _head(tmp_path, ds, "penultimate", "logistic", [2, 2, 2])
    bad = _head(tmp_path, ds, "pool2", "svm", [0, 0, 0])  # the better score
    res = json.loads(bad.read_text())
    res["timings"]["total_s"] = "fast"
    bad.write_text(json.dumps(res))
    result, text = _cli(["report", tmp_path])
    assert result.exit_code == 0, text
    assert "svm @ pool2" not in text and "logistic @ penultimate" in text
    assert "timings.total_s" in text and "not a number" in text
