"""The wide-feature path: taken and skipped as documented, and fitted on train rows only."""
from __future__ import annotations

import numpy as np
import pytest

from featx.config import HeadsConfig
from featx.heads import fit_heads, load_head, plan_memory
from featx.heads.outofcore import WIDE_MIN_DIMS, WIDE_RATIO, is_wide
from tests.builders import write_cache

BIG = 10 ** 12  # a memory limit nothing reaches: only width decides


@pytest.mark.parametrize("dims, train, wide", [
    (WIDE_MIN_DIMS + 1, 100, True),                        # wide and >> rows
    (WIDE_MIN_DIMS, 10, False),                            # not over the width floor
    (WIDE_MIN_DIMS * 4, WIDE_MIN_DIMS * 4 // WIDE_RATIO, False),  # not over 4x the rows
    (131_072, 60, True),                                   # shufflenet pool8 on 60 images
])
def test_wide_rule(dims, train, wide):
    assert is_wide(dims, train) is wide
    plan = plan_memory(train + 10, dims, ["mlp"], limit_bytes=BIG, wide_pca=256,
                       train_rows=train)
    assert (plan.mode, plan.reason) == (("pca", "wide") if wide else ("memory", "memory"))
    if wide:
        assert plan.pca == min(256, train - 1)


def test_wide_pca_zero_fits_the_full_width():
    plan = plan_memory(70, 131_072, ["mlp"], limit_bytes=BIG, wide_pca=0, train_rows=60)
    assert plan.mode == "memory"


def _wide_splits(seed, d=WIDE_MIN_DIMS + 808, n=(30, 10, 12)):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, d)) * 0.05
    out = {}
    for split, k in zip(("train", "val", "test"), n):
        y = np.arange(k) % 3
        out[split] = ({"penultimate": (centers[y] + rng.normal(size=(k, d))).astype(np.float32)},
                      y)
    return out


def test_wide_feature_is_reduced_on_train_only_and_saved_as_one_pipeline(tmp_path):
    splits = _wide_splits(0)
    cache = write_cache(tmp_path / "wide.h5", splits)
    other = _wide_splits(1)  # other val and test rows, the same train rows
    other["train"] = splits["train"]
    cache2 = write_cache(tmp_path / "b" / "wide.h5", other)
    models = []
    for c, out in ((cache, tmp_path / "o1"), (cache2, tmp_path / "o2")):
        run = fit_heads([c], HeadsConfig(heads=("linear",), out_dir=out))
        res = run.results[0]
        assert res["settings"]["memory"]["reason"] == "wide"
        assert res["settings"]["memory"]["pca_components"] == 29  # train rows - 1
        assert res["method"].endswith("[pca29]")
        assert any("is wide" in note for note in run.notes)
        models.append(load_head(run.json_paths[0]))
    X_train = splits["train"][0]["penultimate"]
    for model in models:
        assert list(model.named_steps) == ["prescale", "pca", "scaler", "head"]
        assert model.named_steps["scaler"] == "passthrough"  # components are not whitened
        # the reducer saw train only: its means are train's (float64 sums of float32 rows
        # in blocks, so 1e-5 of the unit-variance scale)
        np.testing.assert_allclose(model.named_steps["prescale"].mean_, X_train.mean(0),
                                   atol=1e-5)
        assert model.predict(X_train).shape == (len(X_train),)  # takes raw features
    # other val/test rows change nothing in the reduction (same process: bit-equal)
    np.testing.assert_array_equal(models[0].named_steps["pca"].components_,
                                  models[1].named_steps["pca"].components_)


def test_wide_mlp_gets_isotropic_components_and_learns_like_the_linear_head(tmp_path):
    """On the wide path the mlp sees the PCA components divided by one number (their root
    mean variance: no whitening) and, on few rows, trains without early stopping. As the
    components came, it trailed the linear head by 11-14 points here; now within 5."""
    from benchmarks.synthetic import write_feature_cache
    gaps, scales = [], []
    for seed in (0, 2):
        cache = write_feature_cache(tmp_path / f"w{seed}.h5", 200, 16_384, 2, seed=seed,
                                    fractions=(0.4, 0.2, 0.4), separation=1.2)
        run = fit_heads([cache], HeadsConfig(heads=("linear", "mlp"), out_dir=tmp_path / f"o{seed}",
                                             jobs=1, bootstrap=0))
        res = {r["head"]: r for r in run.results}
        assert res["mlp"]["settings"]["memory"]["reason"] == "wide"
        assert res["mlp"]["selection"]["fixed"] == {"early_stopping": False}
        gaps.append(res["linear"]["metrics"]["balanced_accuracy"]
                    - res["mlp"]["metrics"]["balanced_accuracy"])
        model = load_head(run.json_paths[[r["head"] for r in run.results].index("mlp")])
        steps = dict(model.steps)
        scales.append(steps["rescale"].scale_)
        assert not steps["head"].early_stopping
    assert np.mean(gaps) <= 0.05, gaps
    for scale in scales:
        assert len(scale) == 79 and np.all(scale == scale[0]) and scale[0] > 1


def test_a_wide_mlp_result_from_before_the_isotropic_inputs_is_fitted_again(tmp_path):
    import json
    splits = _wide_splits(0)
    cache = write_cache(tmp_path / "wide.h5", splits)
    cfg = HeadsConfig(heads=("linear", "mlp"), out_dir=tmp_path / "o", jobs=1, bootstrap=0)
    first = fit_heads([cache], cfg)
    assert any("2 of 2 result(s) are current" in n for n in fit_heads([cache], cfg).notes)
    mlp_json = first.json_paths[[r["head"] for r in first.results].index("mlp")]
    old = json.loads(mlp_json.read_text())
    old["settings"]["request"].pop("wide_inputs", None)  # as the first wide default wrote it
    mlp_json.write_text(json.dumps(old))
    again = fit_heads([cache], cfg)
    assert any("1 of 2 result(s) are current" in n for n in again.notes), again.notes
    assert json.loads(mlp_json.read_text())["settings"]["request"]["wide_inputs"] == "isotropic"
