"""`featx report`: one ranking per dataset and split, honest wall times, plots that open."""
from __future__ import annotations

import csv
import json
import re
import shutil
import struct

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.cli import main
from featx.report import REPORT_COLUMNS, load_results, rank_results, write_report
from featx.results import make_result, write_json
from tests.builders import EXTRACT_S, TILES, XRAY
from tests.builders import dataset_record as _dataset
from tests.builders import metrics_with_mistakes as _metrics
from tests.builders import write_head_result as _head

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _finetune(root, dataset, freeze, wrong, total_s, *, history=True, model="resnet18"):
    run = root / f"{dataset['name']}_{model}_finetune_imagenet-{freeze}-ce-pool1-0a1b2c3d"
    run.mkdir(parents=True)
    artifacts = {"model": "best.pt", "last": "last.pt", "curves": "curves.png"}
    if history:
        artifacts["history"] = "history.csv"
        with open(run / "history.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                        "epoch_s"])
            for e in range(1, 9):
                w.writerow([e, 1.2 / e, 0.5 + 0.05 * e, 1.3 / e + 0.05, 0.45 + 0.05 * e,
                            1e-3, total_s / 8])
    res = make_result(kind="finetune", method=f"finetune freeze={freeze} loss=ce pool=1",
                      dataset=dataset, model=model, metrics=_metrics(dataset["classes"], wrong),
                      timings={"total_s": total_s, "per_epoch_s": total_s / 8,
                               "fit_s": total_s * 0.95, "predict_s": 2.0},
                      feature="penultimate", head="linear", artifacts=artifacts)
    return write_json(run / "result.json", res)


HEAD_ERRORS = {  # (feature, head): mistakes per class on 20 test images per class
    ("penultimate", "logistic"): (3, 5, 4), ("penultimate", "svm"): (4, 5, 4),
    ("penultimate", "linear"): (5, 6, 5), ("pool1", "logistic"): (3, 5, 4),
    ("pool1", "svm"): (4, 5, 4), ("pool1", "linear"): (5, 6, 5),
    ("pool2", "logistic"): (2, 3, 3), ("pool2", "svm"): (2, 4, 3),
    ("pool2", "linear"): (4, 4, 4), ("pool4", "logistic"): (2, 2, 3),
    ("pool4", "svm"): (1, 4, 4), ("pool4", "linear"): (5, 5, 6),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    tiles = _dataset("tiles", TILES)
    for (feature, head), wrong in HEAD_ERRORS.items():
        _head(root, tiles, feature, head, wrong, scores=head != "linear")
    _finetune(root, tiles, "backbone", (2, 3, 2), 600.0)
    _finetune(root, tiles, "none", (0, 1, 1), 1500.0)
    # same dataset name, other test images: a separate, not comparable group
    _head(root, _dataset("tiles", TILES, test_seed=7), "pool2", "logistic", (0, 0, 0),
          cache="tiles-v2_resnet18_imagenet_224")
    # same test images, other train/val images
    _head(root, _dataset("tiles", TILES, train_seed=3), "pool2", "svm", (0, 0, 1),
          cache="tiles-seed3_resnet18_imagenet_224")
    xray = _dataset("xray", XRAY)
    for feature, head, wrong in (("penultimate", "logistic", (2, 6)), ("pool2", "svm", (3, 3))):
        _head(root, xray, feature, head, wrong, cache="xray_resnet18_imagenet_224",
              extract_s=40.0)
    _finetune(root, xray, "backbone", (4, 4), 300.0, history=False)
    # JSON that is not a result is skipped quietly; a broken result is counted
    write_json(root / "notes.json", {"comment": "hand-made"})
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text('{"schema": "featx-result/1", "kind": ')
    return root


@pytest.fixture(scope="module")
def report(results):
    r = CliRunner().invoke(main, ["report", str(results)])
    assert r.exit_code == 0, r.output
    return r


def _ranked(results):
    return rank_results(load_results(results))


def test_every_readable_result_becomes_one_row_and_broken_ones_are_counted(results):
    problems = []
    rows = load_results(results, problems=problems)
    assert len(rows) == len(HEAD_ERRORS) + 2 + 2 + 3
    assert [p for p, _ in problems] == ["broken/result.json"]
    assert "invalid JSON" in problems[0][1]
    assert not any("notes.json" in r["source"] for r in rows)


def test_rows_are_ranked_by_balanced_accuracy_within_each_dataset(results):
    ranked = _ranked(results)
    main = [r for r in ranked if r["group"] == "tiles"]
    assert len(main) == len(HEAD_ERRORS) + 2
    assert {r["dataset"] for r in main} == {"tiles"}
    assert [r["rank"] for r in main] == list(range(1, len(main) + 1))
    scores = [r["test_balanced_accuracy"] for r in main]
    assert scores == sorted(scores, reverse=True)
    assert main[0]["method"] == "finetune freeze=none loss=ce pool=1"
    # every (model, method) occurs once per group
    assert len({(r["model"], r["method"]) for r in main}) == len(main)
    xray = [r for r in ranked if r["group"] == "xray"]
    assert [r["rank"] for r in xray] == [1, 2, 3] and {r["dataset"] for r in xray} == {"xray"}


def test_best_head_and_best_finetune_are_marked_once_per_group(results):
    ranked = _ranked(results)
    for group in ("tiles", "xray"):
        rows = [r for r in ranked if r["group"] == group]
        heads = [r for r in rows if r["kind"] == "head"]
        tuned = [r for r in rows if r["kind"] == "finetune"]
        assert [r for r in rows if r["best"] == "best head"] == [heads[0]]
        assert [r for r in rows if r["best"] == "best finetune"] == [tuned[0]]
    best_head = next(r for r in ranked if r["group"] == "tiles" and r["best"] == "best head")
    assert best_head["method"] == "logistic @ pool4"  # 7 mistakes, fewer than svm's 9


def test_other_splits_of_a_dataset_are_reported_apart_with_the_reason(results):
    ranked = _ranked(results)
    apart = {r["method"]: r for r in ranked if not r["comparable"]}
    assert set(apart) == {"logistic @ pool2", "svm @ pool2"}
    assert apart["logistic @ pool2"]["reason"] == "test set differs"
    assert apart["svm @ pool2"]["reason"] == "split differs (same test set)"
    for r in apart.values():
        assert r["dataset"] == "tiles" and r["group"].startswith("tiles [split ")
        assert r["rank"] == 1 and r["best"] == "best head"  # ranked only among themselves
    # the perfect score on other test images must not top the main ranking
    assert all(r["comparable"] and r["reason"] == "" for r in ranked if r["group"] == "tiles")
    assert ranked[-2]["group"] != ranked[-1]["group"]  # two groups, one row each, at the end


def test_head_wall_time_is_its_share_of_the_extraction_plus_its_own_run(results):
    ranked = _ranked(results)
    for r in ranked:
        t = r["result"]["timings"]
        if r["kind"] == "finetune":
            assert r["wall_s"] == t["total_s"] and r["extract_share_s"] is None
        elif r["group"] == "tiles":  # 12 heads from one cache
            assert r["extract_share_s"] == pytest.approx(EXTRACT_S / 12)
            assert r["wall_s"] == pytest.approx(EXTRACT_S / 12 + t["total_s"] - EXTRACT_S)
        elif r["group"] == "xray":
            assert r["extract_share_s"] == pytest.approx(40.0 / 2)
        else:  # a cache with a single head carries the whole pass
            assert r["extract_share_s"] == pytest.approx(EXTRACT_S)


def test_same_method_from_two_caches_is_told_apart(tmp_path):
    ds = _dataset("tiles", TILES)
    _head(tmp_path, ds, "pool2", "svm", (1, 1, 1), cache="tiles_resnet18_imagenet_224")
    _head(tmp_path, ds, "pool2", "svm", (2, 1, 1), cache="tiles_resnet18_imagenet_256")
    methods = sorted(r["method"] for r in _ranked(tmp_path))
    assert methods == ["svm @ pool2 [tiles_resnet18_imagenet_224]",
                       "svm @ pool2 [tiles_resnet18_imagenet_256]"]


def test_command_prints_the_table_and_the_files_it_wrote(report, results):
    out = report.output
    assert "tiles (split " in out and "xray (split " in out
    assert "NOT COMPARABLE, test set differs" in out
    assert "NOT COMPARABLE, split differs (same test set)" in out
    assert "finetune freeze=none loss=ce pool=1" in out and "best finetune" in out
    assert "1 file(s) look like featx results but could not be read" in out
    assert "notes.json" not in out
    assert "no history CSV" in out  # the xray run without history: curves skipped
    assert f"markdown: {results / 'report' / 'report.md'}" in out
    assert f"csv: {results / 'report' / 'report.csv'}" in out
    assert out.count("plot: ") >= 8


def test_csv_loads_with_pandas_with_one_row_per_result(report, results):
    df = pd.read_csv(results / "report" / "report.csv")
    assert list(df.columns) == REPORT_COLUMNS
    assert len(df) == len(HEAD_ERRORS) + 2 + 2 + 3
    assert df["comparable"].dtype == bool and (~df["comparable"]).sum() == 2
    for _, g in df[df["comparable"]].groupby("dataset"):
        assert g["test_balanced_accuracy"].is_monotonic_decreasing
        assert (g["best"] == "best head").sum() == 1 and (g["best"] == "best finetune").sum() == 1
    assert not df.duplicated(["group", "model", "method"]).any()
    linear = df[(df["group"] == "tiles") & (df["kind"] == "head") & (df["head"] == "linear")]
    assert linear["test_roc_auc"].isna().all()  # no scores: empty cell, read back as NaN
    assert set(df.loc[~df["comparable"], "reason"]) == {"test set differs",
                                                       "split differs (same test set)"}


def test_markdown_has_one_ranking_per_dataset_the_rules_and_the_unreadable_file(report,
                                                                             results):
    md = (results / "report" / "report.md").read_text()
    assert md.index("## tiles (") < md.index("## xray (") < md.index("## Not comparable")
    # the results scored on other images are ranked only under "Not comparable"
    main_part, other_part = md.split("## Not comparable")
    rows = re.compile(r"^\| \d+ \|", re.M)
    assert len(rows.findall(main_part)) == len(HEAD_ERRORS) + 2 + 2 + 3 - 2
    assert len(rows.findall(other_part)) == 2 and "NOT COMPARABLE" not in main_part
    assert "`broken/result.json`: invalid JSON" in md
    assert "number of head results in this report that come from that cache" in md
    assert "![pool_size_tiles](pool_size_tiles.png)" in md
    assert "**best head**" in md and "**best finetune**" in md


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", [
    "pool_size_tiles.png", "pool_size_xray.png", "score_vs_time_tiles.png",
    "score_vs_time_xray.png", "confusion_best_head_tiles.png",
    "confusion_best_finetune_tiles.png", "confusion_best_head_xray.png",
    "curves/tiles_resnet18_finetune_imagenet-backbone-ce-pool1-0a1b2c3d.png",
    "curves/tiles_resnet18_finetune_imagenet-none-ce-pool1-0a1b2c3d.png"])
def test_plots_are_real_pngs(report, results, name):
    path = results / "report" / name
    assert path.stat().st_size > 5_000
    width, height = _png_size(path)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size == (width, height) and width >= 300 and height >= 300
        assert len(np.unique(np.asarray(im.convert("L")))) > 10  # something was drawn


def test_one_dataset_gives_plain_plot_names_and_no_curves_note_when_all_have_history(tmp_path):
    ds = _dataset("tiles", TILES)
    for feature in ("pool1", "pool2"):
        _head(tmp_path, ds, feature, "logistic", (2, 2, 2))
    _finetune(tmp_path, ds, "none", (1, 1, 1), 900.0)
    written = write_report(tmp_path, tmp_path / "rep")
    names = sorted(p.relative_to(tmp_path / "rep").as_posix() for p in written["plot"])
    assert names == ["confusion_best_finetune.png", "confusion_best_head.png",
                     "curves/tiles_resnet18_finetune_imagenet-none-ce-pool1-0a1b2c3d.png",
                     "forest.png", "pool_size.png", "score_vs_time.png"]
    # these built results carry no per-image outputs (that note has its own test in
    # test_paired.py); no other note, in particular none about curves
    assert [n for n in written["note"] if "per-image test outputs" not in n] == []


@pytest.mark.parametrize("setup", ["empty", "only_other_json"])
def test_a_folder_without_results_gives_one_error_line(tmp_path, setup):
    if setup == "only_other_json":
        write_json(tmp_path / "summary.json", {"runs": 3})
    r = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "no featx result files under" in errors[0], r.output


def test_a_history_named_outside_the_runs_folder_is_not_read(tmp_path):
    from featx.report.write import _read_history
    ds = _dataset("tiles", TILES)
    path = _finetune(tmp_path, ds, "backbone", (2, 3, 2), 600.0)
    outside = tmp_path / "elsewhere.csv"
    shutil.copy(path.parent / "history.csv", outside)
    result = json.loads(path.read_text())
    assert _read_history({"path": path, "result": result})[0] is not None
    for name in ("../elsewhere.csv", str(outside)):
        result["artifacts"]["history"] = name
        history, why = _read_history({"path": path, "result": result})
        assert history is None and "own folder" in why, why
