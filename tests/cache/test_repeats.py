"""Repeats: split views of a cache's rows (featx resplit), --repeats over splits without a
second extraction, and over seeds for pre-split data."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.cache import Cache, CacheError, resplit
from featx.data import load_dataset
from tests.builders import write_digits

EXTRACT = ["extract", "--model", "mobilenet_v2", "--weights", "none", "--image-size", "32",
           "--precision", "fp32", "--workers", "0", "--no-progress"]


@pytest.fixture
def digits10(tmp_path) -> Path:
    """3 classes x 10 digit images as class folders, with a nested subfolder in one class
    (so the order of files inside a class is by path components, as pathlib sorts)."""
    root = write_digits(tmp_path / "digits", per_class=10)
    cls = sorted(p for p in root.iterdir() if p.is_dir())[0]
    files = sorted(cls.glob("*.png"))
    (cls / "sub").mkdir()
    for f in files[:3]:
        f.rename(cls / "sub" / f.name)
    (cls / "sub-a.png").write_bytes(files[3].read_bytes())
    return root


@pytest.fixture
def cache10(digits10, tmp_path, cli) -> Path:
    r = cli(*EXTRACT, "--data", digits10, "--out", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    return Path(r.stdout.strip().splitlines()[-1])


def _full_lists(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {s: list(zip(f[f"split/{s}/paths"].asstr()[:], f[f"split/{s}/labels"][:].tolist()))
                for s in ("train", "val", "test") if f"split/{s}" in f}


def test_a_split_view_is_the_split_extract_would_make_from_the_same_rows(digits10, cache10):
    parent = Cache(cache10)
    by_path = {p: parent.load(s, "penultimate")[i] for s in parent.splits
               for i, p in enumerate(parent.paths(s))}
    tests = set()
    for seed in range(1, 5):
        view = resplit(cache10, seed)
        assert view.status == "written" and view.path.name == f"{cache10.stem}_split{seed}.h5"
        expect = load_dataset(digits10, seed=seed)
        assert _full_lists(view.path) == expect.splits  # what extract --split-seed S stores
        v = Cache(view.path)
        assert v.is_view and v.attrs["split_seed"] == seed
        assert v.attrs["dataset_fingerprint"] == expect.fingerprint()
        for s in v.splits:  # each row is the parent's row of that very file: no new pass
            X = v.load(s, "penultimate")
            assert v.split_items(s) == expect.splits[s]
            for i, p in enumerate(v.paths(s)):
                np.testing.assert_array_equal(X[i], by_path[p])  # same file, same process
            blocks = np.concatenate([b for _, b in v.iter_rows(s, "penultimate", 4)])
            np.testing.assert_array_equal(blocks, X)
            idx = np.array([len(X) - 1, 0])
            np.testing.assert_array_equal(v.rows(s, "penultimate", idx), X[idx])
        tests.add(tuple(v.paths("test")))
        assert v.dataset_info()["files_fingerprint"] == parent.dataset_info()["files_fingerprint"]
        assert v.dataset_info()["test_fingerprint"] != parent.dataset_info()["test_fingerprint"]
        with h5py.File(view.path, "r") as f:  # an index, not a copy of the features
            assert "penultimate" not in f["train"]
    tests.add(tuple(parent.paths("test")))
    assert len(tests) == 5  # K split seeds, K different test sets
    assert resplit(cache10, 3).status == "up-to-date"


def test_extract_finds_a_split_view_up_to_date(digits10, cache10, cli):
    view = resplit(cache10, 2).path
    r = cli(*EXTRACT, "--data", digits10, "--out", cache10.parent, "--split-seed", "2")
    assert r.exit_code == 0, r.output
    assert "up to date, nothing to do" in r.output and r.stdout.strip().endswith(view.name)


def test_resplit_command_and_info(cache10, cli):
    r = cli("resplit", cache10, "--split-seed", "1", "--split-seed", "2")
    assert r.exit_code == 0, r.output
    paths = r.stdout.strip().splitlines()
    assert [Path(p).name for p in paths] == [f"{cache10.stem}_split{s}.h5" for s in (1, 2)]
    info = cli("info", paths[0])
    assert info.exit_code == 0 and "split view of" in info.output


def test_a_view_of_a_re_extracted_cache_is_refused_in_one_line(cache10, cli):
    view = resplit(cache10, 1).path
    with h5py.File(cache10, "a") as f:  # as a new extraction would: another creation time
        f.attrs["created"] = "2099-01-01T00:00:00"
    with pytest.raises(CacheError, match="extracted again since"):
        Cache(view)
    r = cli("fit-heads", view, "--heads", "logistic", "--out", cache10.parent / "r")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error:")
    assert "featx resplit" in r.output


def test_pre_split_data_cannot_be_resplit(tmp_path, cli):
    root = write_digits(tmp_path / "ds", layout="split", per_class=10)
    r = cli(*EXTRACT, "--data", root, "--out", tmp_path / "cache")
    cache = Path(r.stdout.strip().splitlines()[-1])
    r = cli("resplit", cache, "--split-seed", "1")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "repeat over --seed" in r.output.strip().splitlines()[-1]


def test_fit_heads_repeats_over_split_views_or_over_seeds(cache10, tmp_path, cli):
    out = tmp_path / "r"
    r = cli("fit-heads", cache10, "--heads", "logistic", "--repeats", "3", "--out", out,
            "--jobs", "1")
    assert r.exit_code == 0, r.output
    res = [json.loads(p.read_text()) for p in sorted(out.rglob("penultimate__logistic.json"))]
    assert [x["repeat"]["split_seed"] for x in res] == [0, 1, 2]
    assert len({x["dataset"]["test_fingerprint"] for x in res}) == 3
    assert len({x["repeat"]["experiment"] for x in res}) == 1
    assert len({x["dataset"]["files_fingerprint"] for x in res}) == 1

    pre = write_digits(tmp_path / "ds", layout="split", per_class=10)
    r = cli(*EXTRACT, "--data", pre, "--out", tmp_path / "c2")
    cache = Path(r.stdout.strip().splitlines()[-1])
    out2 = tmp_path / "r2"
    r = cli("fit-heads", cache, "--heads", "mlp", "--repeats", "3", "--out", out2, "--jobs", "1")
    assert r.exit_code == 0, r.output
    res = [json.loads(p.read_text()) for p in sorted(out2.rglob("penultimate__mlp.json"))]
    assert sorted(x["repeat"]["seed"] for x in res) == [0, 1, 2]
    assert len({x["dataset"]["split_fingerprint"] for x in res}) == 1  # the data's own split
    assert len({x["repeat"]["experiment"] for x in res}) == 1


def test_compare_with_5_repeats_extracts_once(digits10, tmp_path, cli, monkeypatch):
    import featx.extract.single as single
    passes = []
    real = single.fill_cache

    def counting(*args, **kwargs):  # every forward pass over images goes through it
        passes.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(single, "fill_cache", counting)
    out = tmp_path / "cmp"
    r = cli("compare", "--data", digits10, "--models", "mobilenet_v2", "--weights", "none",
            "--image-size", "32", "--precision", "fp32", "--workers", "0", "--pool", "1",
            "--heads", "logistic", "--finetune", "none", "--repeats", "5", "--no-progress",
            "--cache-dir", tmp_path / "cache", "--out", out)
    assert r.exit_code == 0, r.output
    assert len(passes) == 1
    caches = sorted((tmp_path / "cache").glob("*.h5"))
    assert len(caches) == 5 and sum(not Cache(c).is_view for c in caches) == 1
    res = [json.loads(p.read_text()) for p in out.rglob("penultimate__logistic.json")]
    assert sorted(x["repeat"]["split_seed"] for x in res) == [0, 1, 2, 3, 4]
    assert len({x["dataset"]["test_fingerprint"] for x in res}) == 5
    import csv
    with open(out / "report" / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # logistic on the penultimate, 5 splits (mobilenet_v2's pool1 is its penultimate: stored
    # and fitted once); one method, so it is the best on every split and has no test
    assert len(rows) == 5 and {r["repeats_n"] for r in rows} == {"5"}
    assert {(r["feature"], r["repeats_mark"]) for r in rows} == {("penultimate", "best")}
    assert {r["repeats_p"] for r in rows} == {""}
    assert "## Repeats over splits and seeds" in (out / "report" / "report.md").read_text()


def test_finetune_repeats_over_views_of_its_cache_or_over_split_seeds(digits10, cache10, cli,
                                                                     monkeypatch):
    import featx.finetune
    seen = []
    common = ["finetune", "--model", "mobilenet_v2", "--weights", "none", "--workers", "0"]
    # the data and seed each run would train on, not the training
    monkeypatch.setattr(featx.finetune, "finetune", lambda data, cfg, **kw: seen.append(
        (data.info["split_fingerprint"], data.info["split_seed"], cfg.seed)) or _Done())
    r = cli(*common, "--split-from", cache10, "--repeats", "3")
    assert r.exit_code == 0, r.output
    views = [Cache(cache10)] + [Cache(resplit(cache10, s).path) for s in (1, 2)]
    assert seen == [(v.dataset_info()["split_fingerprint"], s, 0) for s, v in enumerate(views)]
    seen.clear()
    cli(*common, "--data", digits10, "--repeats", "2", "--seed", "4")
    assert [(s, seed) for _, s, seed in seen] == [(0, 4), (1, 4)]
    assert seen[0][0] == views[0].dataset_info()["split_fingerprint"]  # same files, same split
    assert seen[1][0] == views[1].dataset_info()["split_fingerprint"]


class _Done:
    """What the stubbed finetune returns: enough for the command to print its summary."""

    result = {"metrics": {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0},
              "selection": {"best_epoch": 1, "criterion": "val_loss", "scored_split": "test"},
              "timings": {"total_s": 0.0}}
    result_path = "result.json"
