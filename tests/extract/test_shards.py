"""Extraction under torchrun (2 gloo ranks on the CPU) against the single-process cache."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torchvision import models

from featx.cache import Cache, CacheWriter, partial_path
from featx.cli import main
from featx.config import ExtractConfig
from featx.data import load_dataset
from featx.extract import extract, shard_bounds, shard_dir, shard_path
from featx.extract.sharded import _plan
from tests.builders import CROSS_ATOL, CROSS_RTOL, write_digits
from tests.builders import h5_datasets as _datasets

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """40 digit PNGs and 2 broken files, random resnet18 weights in a file, and the cache one
    plain process makes of them."""
    tmp = tmp_path_factory.mktemp("shards")
    root = write_digits(tmp / "d", classes=(0, 1), per_class=20, size=32)
    (root / "digit0" / "broken.png").write_text("not a png")
    (root / "digit1" / "broken.png").write_text("not a png either")
    torch.manual_seed(3)
    weights = tmp / "w.pth"
    torch.save(models.resnet18().state_dict(), weights)
    cfg = ExtractConfig(model="resnet18", weights=str(weights), pools=(1, 2), image_size=32,
                        batch_size=4, workers=0, precision="fp32", out_dir=tmp / "single",
                        progress=False)
    whole = extract(load_dataset(root), cfg).path
    return tmp, root, weights, whole


def _args(root, weights, out):
    return ["extract", "--model", "resnet18", "--data", str(root), "--weights", str(weights),
            "--pool", "1,2", "--image-size", "32", "--batch-size", "4", "--workers", "0",
            "--precision", "fp32", "--no-progress", "--out", str(out)]


def _torchrun(args, cwd, **env):
    """``torchrun --standalone --nproc-per-node 2 -m featx ARGS`` with this checkout's code."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH",
                                                                                 "")]), **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "featx", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _assert_same_cache(reference: Path, path: Path):
    a, b = _datasets(reference), _datasets(path)
    assert a.keys() == b.keys()
    for k in a:
        if a[k].dtype.kind == "f":  # rows from other processes: float32 convolutions summed
            # in another thread split differ in the last bits, hence CROSS_RTOL/CROSS_ATOL
            np.testing.assert_allclose(b[k], a[k], rtol=CROSS_RTOL, atol=CROSS_ATOL, err_msg=k)
        else:  # labels, paths, the split lists, the skipped files: identical, in order
            np.testing.assert_array_equal(b[k], a[k], err_msg=k)
    c = Cache(path)  # and it opens as a complete cache through the ordinary API
    assert c.paths("train") == Cache(reference).paths("train")
    assert len(c.skipped()) == 2


def test_shards_cut_every_split_into_disjoint_contiguous_blocks():
    for n in (0, 1, 5, 29, 100):
        for k_all in (1, 2, 3, 7):
            rows = [i for k in range(k_all) for i in range(*shard_bounds(n, k, k_all))]
            assert rows == list(range(n))  # no duplicates, no padding, in order
            sizes = [hi - lo for lo, hi in (shard_bounds(n, k, k_all) for k in range(k_all))]
            assert max(sizes) - min(sizes) <= 1


def test_two_ranks_write_the_single_process_cache_and_compare_reports_once(setup):
    """``torchrun -m featx compare``: both ranks extract, rank 0 alone fits and reports."""
    tmp, root, weights, whole = setup
    args = ["compare", "--data", str(root), "--models", "resnet18", "--weights", str(weights),
            "--pool", "1,2", "--image-size", "32", "--batch-size", "4", "--workers", "0",
            "--precision", "fp32", "--no-progress", "--finetune", "none", "--heads", "logistic",
            "--cache-dir", str(tmp / "two"), "--out", str(tmp / "two_results")]
    r = _torchrun(args, cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    final = tmp / "two" / whole.name
    _assert_same_cache(whole, final)
    assert not shard_dir(final).exists()  # joined into one self-contained file
    attrs = Cache(final).attrs
    assert attrs["world_size"] == 2 and attrs["timings"]["shards"] == 2
    # rank 0 joins only when every shard is finished, so shard 1 was done by rank 1;
    # the status line is printed once, by rank 0
    assert r.stderr.count("extract resnet18: written") == 1
    # one report, from rank 0: one table header (the verdict line names the head too)
    assert r.stdout.count("rank  model") == 1 and "logistic @ penultimate" in r.stdout
    heads = sorted(p.name for p in (tmp / "two_results").rglob("*__logistic.json"))
    # pool1 is resnet18's penultimate: fitted once
    assert heads == ["penultimate__logistic.json", "pool2__logistic.json"]


def test_a_killed_rank_resumes_with_two_ranks_or_with_one_process(setup):
    tmp, root, weights, whole = setup
    out = tmp / "cut"
    r = _torchrun(_args(root, weights, out), cwd=tmp, FEATX_TEST_KILL_AFTER_BATCHES="1:2")
    assert r.returncode != 0
    final = out / whole.name
    assert not final.exists() and not partial_path(final).exists()
    shard1 = partial_path(shard_path(final, 1, 2))
    with h5py.File(shard1, "r") as f:  # rank 1 died right after its 2nd committed batch
        assert f["train"].attrs["next_index"] == 8 and f["train/labels"].shape == (8,)
    with pytest.raises(Exception, match="unfinished"):
        Cache(shard1)
    shutil.copytree(out, tmp / "cut_for_one")

    r = _torchrun(_args(root, weights, out), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[resumed]" in r.stderr and "rank 1/2: extracted shard(s) 1 of 2" in r.stderr
    assert r.stdout.split() == [str(final)]  # rank 0 alone prints the cache path
    _assert_same_cache(whole, final)

    # the same partial shards, finished by one plain process: it does every shard's rest
    res = CliRunner().invoke(main, _args(root, weights, tmp / "cut_for_one"))
    assert res.exit_code == 0, res.output
    assert "[resumed]" in res.output
    _assert_same_cache(whole, tmp / "cut_for_one" / whole.name)
    assert not shard_dir(tmp / "cut_for_one" / whole.name).exists()


def test_a_single_process_partial_becomes_shard_0_of_1_under_torchrun(setup, monkeypatch):
    """torchrun meeting a plain ``.partial`` keeps its rows: it becomes the one shard, which
    any process finishes (run here by one process, to spare a torchrun launch; the 2-rank
    runs above cover the rest of the path)."""
    tmp, root, weights, whole = setup
    out = tmp / "one_then_two"
    real_append, seen = CacheWriter.append, []

    def dying_append(self, *a, **k):
        real_append(self, *a, **k)
        seen.append(1)
        if len(seen) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        extract(load_dataset(root), ExtractConfig(
            model="resnet18", weights=str(weights), pools=(1, 2), image_size=32, batch_size=4,
            workers=0, precision="fp32", out_dir=out, progress=False))
    monkeypatch.setattr(CacheWriter, "append", real_append)
    final = out / whole.name
    prov = Cache(whole).attrs  # the same inputs
    assert _plan(final, {**prov, "weights_sha256": "0" * 64}, 2) == 2  # other inputs: fresh
    assert partial_path(final).exists()
    assert _plan(final, prov, 2) == 1
    shard = partial_path(shard_path(final, 0, 1))
    assert not partial_path(final).exists() and shard.exists()
    with h5py.File(shard, "r") as f:
        assert f["train"].attrs["next_index"] == 12  # the 3 committed batches are kept
    res = CliRunner().invoke(main, _args(root, weights, out))
    assert res.exit_code == 0, res.output
    assert "[resumed]" in res.output
    _assert_same_cache(whole, final)


def test_shards_from_other_inputs_are_discarded_not_joined(setup, tmp_path):
    """A shard folder left by a run with other weights must not leak into a new cache."""
    tmp, root, weights, whole = setup
    stale = shard_path(tmp_path / whole.name, 0, 2)
    stale.parent.mkdir(parents=True)
    shutil.copy(whole, stale)  # a complete-looking shard ...
    with h5py.File(stale, "r+") as f:
        f.attrs["weights_sha256"] = "0" * 64  # ... made from other weights
    res = CliRunner().invoke(main, _args(root, weights, tmp_path))
    assert res.exit_code == 0, res.output
    assert not shard_dir(tmp_path / whole.name).exists()
    _assert_same_cache(whole, tmp_path / whole.name)


def test_a_bad_torchrun_environment_is_one_clear_line(setup, tmp_path):
    tmp, root, weights, whole = setup
    res = CliRunner().invoke(main, _args(root, weights, tmp_path),
                             env={"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert res.exit_code != 0
    assert "RANK='one'" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, _args(root, weights, tmp_path),
                             env={"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert res.exit_code != 0 and "the rank must be 0..1" in res.output
    assert not list(tmp_path.glob("*.h5"))


def test_python_dash_m_featx_is_the_featx_command():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "featx", "extract", "--help"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Usage: featx extract" in r.stdout
