"""One answer to "is this head result current?" for `fit-heads` and `compare`."""
from __future__ import annotations

import json

import pytest

from featx.cache import Cache
from featx.compare import _heads_config, _heads_up_to_date
from featx.config import CompareConfig
from featx.head_current import current_head_result, head_request
from featx.heads import fit_heads
from tests.builders import blob_splits, write_cache

REUSED = "result(s) are current"

# every key of the stored request, and the cache identity, each given another value
CHANGES = [
    ("request", "head", "logistic"), ("request", "feature", "pool1"),
    ("request", "mode", "pca"), ("request", "pca", 8), ("request", "select", "cv"),
    ("request", "cv", 3), ("request", "standardize", False),
    ("request", "class_weight", "balanced"), ("request", "seed", 1),
    ("request", "solver", "torch"), ("request", "wide_pca", 0),
    ("request", "heads", ["linear", "logistic"]), ("request", "grid", {"alpha": [1.0]}),
    ("provenance", "created", "2000-01-01T00:00:00"),
    ("provenance", "weights_sha256", "1" * 64),
]
# the memory plan and the grids come from the head registry (sklearn): compare, which must
# not import sklearn on a no-op re-run, leaves them to fit-heads
PLAN_KEYS = {"mode", "pca", "grid"}


@pytest.fixture
def fitted(tmp_path):
    path = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(pools=(1,)))
    cfg = CompareConfig(models=("resnet18",), pools=(1,), heads=("linear",), seed=0,
                        out=tmp_path / "results", cache_dir=tmp_path)
    hcfg = _heads_config(cfg, ["linear"], ["penultimate"], cfg.out)
    fit_heads([path], hcfg)
    json_path = cfg.out / path.stem / "heads" / "penultimate__linear.json"
    return Cache(path), cfg, hcfg, json_path


def test_request_is_stored_whole_and_compares_equal(fitted):
    cache, cfg, hcfg, json_path = fitted
    stored = json.loads(json_path.read_text())["settings"]["request"]
    assert list(stored) == ["head", "feature", "mode", "pca", "select", "cv", "standardize",
                            "class_weight", "seed", "solver", "wide_pca", "heads", "grid"]
    assert set(stored) == {key for where, key, _ in CHANGES if where == "request"}
    partial = head_request(hcfg, head="linear", feature="penultimate", select_on="val",
                           streamed=False)
    assert current_head_result(json_path, cache.attrs, partial) is not None
    assert current_head_result(json_path, cache.attrs, {**stored, "seed": 1}) is None
    assert current_head_result(json_path, cache.attrs, stored) is not None


@pytest.mark.parametrize("where, key, value", CHANGES, ids=[c[1] for c in CHANGES])
def test_a_changed_request_or_cache_is_refitted_by_fit_heads_and_compare(fitted, where, key,
                                                                         value):
    cache, cfg, hcfg, json_path = fitted
    assert _heads_up_to_date(cache, ["penultimate"], ["linear"], cfg.out, cfg) == [
        "penultimate"]
    assert any(REUSED in n for n in fit_heads([cache.path], hcfg).notes)

    before = json_path.read_text()
    res = json.loads(before)
    part = res["settings"]["request"] if where == "request" else res["provenance"]
    assert part.get(key) != value  # the test cache has no "created": it gains one
    part[key] = value
    json_path.write_text(json.dumps(res))

    compare_reuses = _heads_up_to_date(cache, ["penultimate"], ["linear"], cfg.out, cfg)
    assert compare_reuses == (["penultimate"] if key in PLAN_KEYS else [])
    refit = fit_heads([cache.path], hcfg)
    assert not any(REUSED in n for n in refit.notes)
    refitted, first = json.loads(json_path.read_text()), json.loads(before)
    assert refitted["provenance"] == first["provenance"]
    assert refitted["settings"]["request"] == first["settings"]["request"]
