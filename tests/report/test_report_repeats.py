"""The report's repeats summary (mean ± sd, paired t-test vs the best, Holm) and its
label-efficiency plot."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy import stats

from featx.report import write_report
from featx.report.repeats import holm
from featx.results import make_result, repeat_record, write_json
from tests.builders import TILES, dataset_record, metrics_with_mistakes

K = 6
# mistakes per class (of 20 test images each) on each of the K splits
WRONG = {"logistic": [[1, 2, 1], [2, 2, 2], [0, 1, 2], [1, 1, 1], [3, 1, 2], [1, 0, 1]],
         "linear": [[4, 3, 5], [5, 4, 4], [3, 5, 6], [4, 4, 3], [6, 5, 4], [2, 3, 5]],
         "knn": [[2, 2, 1], [2, 3, 2], [1, 1, 2], [1, 2, 1], [3, 2, 2], [1, 1, 1]]}


def _head_result(root, dataset, head, wrong, split_seed, *, subset=None, kind="head",
                 seed=0):
    m = metrics_with_mistakes(dataset["classes"], wrong)
    t = {"extract_s": 10.0, "fit_s": 1.0, "total_s": 12.0}
    method = f"{head} @ penultimate" if kind == "head" else "finetune freeze=none loss=ce pool=1"
    res = make_result(kind=kind, method=method, dataset=dataset, model="resnet18", metrics=m,
                      timings=t, feature="penultimate", head=head,
                      provenance={"created": "2024-05-01T10:00:00", "model": "resnet18"},
                      artifacts={"cache": f"/cache/tiles_split{split_seed}.h5"},
                      repeat=repeat_record({"method": method, "subset": subset is not None},
                                           split_seed=split_seed, seed=seed),
                      train_subset=subset)
    tag = "" if subset is None else f"__shots{subset['shots']}-d{subset['draw']}"
    name = f"tiles_split{split_seed}_seed{seed}" if kind == "head" else \
        f"ft_split{split_seed}_seed{seed}{tag}"
    return write_json(root / name / "heads" / f"penultimate__{head}{tag}.json", res)


@pytest.fixture
def repeated(tmp_path):
    root = tmp_path / "results"
    for k in range(K):
        ds = dataset_record("tiles", TILES, test_seed=k, train_seed=k)
        for head, wrong in WRONG.items():
            _head_result(root, ds, head, wrong[k], k)
        _head_result(root, ds, "same", WRONG["logistic"][k], k)  # = logistic on every split
    return root


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_repeats_give_mean_sd_and_a_paired_t_test_against_the_best(repeated):
    written = write_report(repeated)
    rows = _csv(written["csv"])
    scores = {h: [] for h in [*WRONG, "same"]}
    for r in sorted(rows, key=lambda r: int(r["split_seed"])):
        scores[r["head"]].append(float(r["test_balanced_accuracy"]))
    assert all(len(v) == K for v in scores.values())
    summary = {r["head"]: r for r in rows}
    best = summary["logistic"]
    assert best["repeats_mark"] == "best" and summary["same"]["repeats_mark"] == "≈ best"
    for head, r in summary.items():
        x = np.array(scores[head])
        assert int(r["repeats_n"]) == K
        assert float(r["repeats_mean"]) == pytest.approx(x.mean(), abs=1e-6)  # csv: 6 decimals
        assert float(r["repeats_sd"]) == pytest.approx(x.std(ddof=1), abs=1e-6)
    raw = {h: stats.ttest_rel(scores[h], scores["logistic"]).pvalue for h in ("linear", "knn")}
    assert float(summary["same"]["repeats_p"]) == 1.0  # identical on every split
    for h in ("linear", "knn"):
        # report.csv rounds to 6 decimals
        assert float(summary[h]["repeats_p"]) == pytest.approx(raw[h], rel=1e-4, abs=1e-6)
    # Holm over the group's three tests, by hand
    ps = [raw["linear"], raw["knn"], 1.0]
    order = np.argsort(ps)
    adj = np.minimum(1, np.maximum.accumulate([(3 - i) * ps[j] for i, j in enumerate(order)]))
    expect = dict(zip(np.array(["linear", "knn", "same"])[order], adj))
    for h in ("linear", "knn"):
        assert float(summary[h]["repeats_p_holm"]) == pytest.approx(expect[h], rel=1e-4,
                                                                    abs=1e-6)
    assert float(summary["linear"]["repeats_p_holm"]) < 0.05  # 3 points worse on every split
    assert summary["linear"]["repeats_mark"] == ""
    md = written["markdown"].read_text()
    assert "## Repeats over splits and seeds" in md and "≈ best" in md
    # the other splits are marked as repeats, not only as another test set
    assert any("another repeat (split seed" in r["reason"] for r in rows)


def test_holm_matches_the_textbook_example():
    # Holm (1979) as in every textbook: sorted p 0.01, 0.03, 0.04 of m = 3 -> 0.03, 0.06, 0.06
    assert holm([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])
    assert math.isnan(holm([float("nan"), 0.01])[0]) and holm([float("nan"), 0.01])[1] == 0.01


def test_label_efficiency_is_plotted_and_not_ranked(tmp_path):
    root = tmp_path / "results"
    ds = dataset_record("tiles", TILES)
    expect = {}
    for shots, wrong in ((1, 9), (4, 5), (16, 2)):
        for draw in range(3):
            for kind in ("head", "finetune"):
                w = wrong + draw + (1 if kind == "finetune" else 0)
                sub = {"shots": shots, "fraction": None, "draw": draw, "seed": 0,
                       "n_train": 3 * shots, "n_train_full": 90, "per_class": [shots] * 3,
                       "train_fingerprint": "0" * 64}
                p = _head_result(root, ds, "logistic", [w, w, w], 0, subset=sub, kind=kind)
                expect.setdefault((kind, shots), []).append(1 - w / 20)
                assert p.is_file()
    _head_result(root, ds, "logistic", [1, 1, 1], 0)  # one result on all of train
    written = write_report(root)
    pngs = [p for p in written["plot"] if p.name.startswith("label_efficiency")]
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000
    md = written["markdown"].read_text()
    assert f"]({pngs[0].name})" in md and "## Label efficiency" in md
    assert "logistic @ penultimate" in written["table"]
    assert written["table"].count("logistic @ penultimate") == 1  # subsets are not ranked
    points = _csv(written["csv"].parent / "label_efficiency.csv")
    assert len(points) == 6
    for p in points:
        vals = expect[(p["kind"], int(float(p["size"].split()[1])))]
        assert float(p["mean"]) == pytest.approx(np.mean(vals), abs=1e-6)
        assert float(p["sd"]) == pytest.approx(np.std(vals, ddof=1), abs=1e-6)
        assert float(p["x"]) == float(p["size"].split()[1])
    rows = _csv(written["csv"])
    assert sum(r["group"] == "tiles [label efficiency]" for r in rows) == 18
