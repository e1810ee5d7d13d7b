"""Label efficiency: seeded stratified subsets of train (featx.data.subsets), fit-heads
--shots/--train-fraction/--draws, and finetune on the very same images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from featx.cache import Cache
from featx.config import HeadsConfig
from featx.data.subsets import TrainSubset, draw_train_subset, train_subsets
from featx.errors import ParameterError
from featx.heads import fit_heads
from tests.builders import write_cache

EXTRACT = ["extract", "--model", "mobilenet_v2", "--weights", "none", "--image-size", "32",
           "--precision", "fp32", "--workers", "0", "--no-progress"]


def _items(n_per_class=(30, 20, 12)):
    return [(f"c{c}/{i:03d}.png", c) for c, n in enumerate(n_per_class) for i in range(n)]


def test_shots_draw_exactly_k_per_class_nested_and_seeded():
    items, classes = _items(), ["a", "b", "c"]
    for k in (1, 2, 4, 8):
        idx = draw_train_subset(items, classes, TrainSubset(shots=k, draw=1), seed=7)
        assert np.bincount([items[i][1] for i in idx], minlength=3).tolist() == [k, k, k]
        assert len(set(idx.tolist())) == len(idx)
    sets = [set(draw_train_subset(items, classes, TrainSubset(shots=k), seed=7).tolist())
            for k in (1, 2, 4, 8)]
    assert all(a < b for a, b in zip(sets, sets[1:]))  # nested within one draw
    a = draw_train_subset(items, classes, TrainSubset(shots=4, draw=0), seed=7)
    b = draw_train_subset(items, classes, TrainSubset(shots=4, draw=1), seed=7)
    assert set(a.tolist()) != set(b.tolist())  # another draw, other images
    # the draw depends on the files, not on their order
    shuffled = [items[i] for i in np.random.default_rng(0).permutation(len(items))]
    c = draw_train_subset(shuffled, classes, TrainSubset(shots=4, draw=0), seed=7)
    assert sorted(shuffled[i] for i in c) == sorted(items[i] for i in a)


def test_fractions_are_stratified():
    items, classes = _items(), ["a", "b", "c"]
    for f in (0.01, 0.1, 0.5, 1.0):
        idx = draw_train_subset(items, classes, TrainSubset(fraction=f), seed=0)
        counts = np.bincount([items[i][1] for i in idx], minlength=3)
        assert counts.tolist() == [max(1, round(f * n)) for n in (30, 20, 12)]
    # a fraction of 1 is all of train: one draw, not --draws identical ones
    assert [s.tag for s in train_subsets((2,), (0.5, 1), 2)] == [
        "shots2-d0", "shots2-d1", "frac0.5-d0", "frac0.5-d1", "frac1-d0"]


def test_more_shots_than_a_class_has_is_one_clear_line():
    with pytest.raises(ParameterError, match=r"^shots=16: class 'c' has only 12 train image"):
        draw_train_subset(_items(), ["a", "b", "c"], TrainSubset(shots=16), seed=0)
    with pytest.raises(ParameterError, match="train_fraction"):
        train_subsets((), (0, 0.5))
    with pytest.raises(ParameterError, match="shots"):
        train_subsets(("2.5",), ())


@pytest.fixture
def digits_cache(tmp_path, digits_dir, cli) -> Path:
    r = cli(*EXTRACT, "--data", digits_dir, "--out", tmp_path / "cache")
    assert r.exit_code == 0, r.output
    return Path(r.stdout.strip().splitlines()[-1])


def test_fit_heads_shots_train_on_k_per_class_and_never_on_val_or_test(digits_cache, tmp_path,
                                                                       cli):
    out = tmp_path / "r"
    r = cli("fit-heads", digits_cache, "--heads", "logistic", "--shots", "1,4",
            "--train-fraction", "0.5", "--draws", "2", "--out", out, "--jobs", "1")
    assert r.exit_code == 0, r.output
    cache = Cache(digits_cache)
    train = set(cache.split_items("train"))
    held_out = set(cache.split_items("val")) | set(cache.split_items("test"))
    files = sorted(out.rglob("penultimate__logistic__*.json"))
    assert [p.stem.split("__")[-1] for p in files] == [
        "frac0.5-d0", "frac0.5-d1", "shots1-d0", "shots1-d1", "shots4-d0", "shots4-d1"]
    for p in files:
        res = json.loads(p.read_text())
        sub = res["train_subset"]
        idx = draw_train_subset(cache.split_items("train"), cache.classes,
                                TrainSubset(sub["shots"], sub["fraction"], sub["draw"]), 0)
        picked = {cache.split_items("train")[i] for i in idx}
        assert picked <= train and not picked & held_out
        if sub["shots"]:
            assert sub["per_class"] == [sub["shots"]] * 3
        assert sub["n_train"] == len(picked) and sub["n_train_full"] == len(train)
        # scored on the cache's whole test split, grouped with the full-train results
        assert res["metrics"]["n"] == len(cache.labels("test"))
        assert res["dataset"]["test_fingerprint"] == cache.dataset_info()["test_fingerprint"]
    r = cli("fit-heads", digits_cache, "--heads", "logistic", "--shots", "50", "--out", out)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: --shots 50: class ")


def test_finetune_trains_on_the_images_fit_heads_drew(digits_cache, digits_dir, tmp_path, cli,
                                                      monkeypatch):
    from featx.data import load_dataset
    from featx.finetune import data_from_cache, data_from_spec, subset_data
    out = tmp_path / "r"
    r = cli("fit-heads", digits_cache, "--heads", "logistic", "--shots", "2", "--draws", "1",
            "--seed", "3", "--out", out, "--jobs", "1")
    assert r.exit_code == 0, r.output
    head = json.loads(next(out.rglob("*__shots2-d0.json")).read_text())["train_subset"]
    sub = TrainSubset(shots=2)
    a = subset_data(data_from_cache(digits_cache), sub, 3)
    b = subset_data(data_from_spec(load_dataset(digits_dir), workers=0), sub, 3)
    for d in (a, b):
        assert d.info["train_subset"]["train_fingerprint"] == head["train_fingerprint"]
        assert d.splits["val"] == Cache(digits_cache).split_items("val")
    # and the command: one run per subset, trained on those images
    import featx.finetune
    seen = []

    def stub(data, cfg, **kw):
        seen.append((data.info["train_subset"]["train_fingerprint"], cfg.seed))
        raise SystemExit(0)
    monkeypatch.setattr(featx.finetune, "finetune", stub)
    cli("finetune", "--model", "mobilenet_v2", "--split-from", digits_cache, "--weights",
        "none", "--shots", "2", "--draws", "1", "--seed", "3", "--workers", "0")
    assert seen == [(head["train_fingerprint"], 3)]


def test_a_head_learns_more_with_more_shots_on_real_digits(tmp_path):
    """sklearn's digits (1797 real 8x8 scans, 10 classes) as 64 raw pixel features."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(y))
    X, y = X[order], y[order]
    cut = {"train": slice(0, 1000), "val": slice(1000, 1300), "test": slice(1300, None)}
    splits = {s: ({"penultimate": X[c]}, y[c]) for s, c in cut.items()}
    cache = write_cache(tmp_path / "digits.h5", splits, classes=[str(d) for d in range(10)])
    run = fit_heads([cache], HeadsConfig(heads=("logistic",), shots=(1, 16), draws=3,
                                         out_dir=tmp_path / "r", jobs=1))
    scores = {1: [], 16: []}
    for res in run.results:
        scores[res["train_subset"]["shots"]].append(res["metrics"]["balanced_accuracy"])
    # 1 image per class vs 16: ~0.6 vs ~0.9 here; the margin is many times the spread of
    # the 3 draws
    assert len(scores[1]) == len(scores[16]) == 3
    assert np.mean(scores[16]) > np.mean(scores[1]) + 0.1
    assert min(scores[16]) > max(scores[1])
