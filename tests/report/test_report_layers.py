"""featx/report/layers.py: heads on every layer x pool (fit-heads --features all), the
layer-wise plot in the report, and the best layer per head named from the result files."""
from __future__ import annotations

import json
from pathlib import Path

from featx.config import ExtractConfig, HeadsConfig
from featx.data import load_dataset
from featx.extract import extract
from featx.heads import fit_heads
from featx.report import write_report
from featx.report.layers import LAST_MAP, best_layers, layer_lines
from tests.builders import write_digits


def test_fit_heads_all_covers_every_layer_and_the_report_names_the_best_layer(tmp_path):
    data = write_digits(tmp_path / "d", per_class=8)
    cfg = ExtractConfig(model="resnet18", weights="none", pools=(1, 2), layers=("layer2",
                        "layer3"), image_size=32, device="cpu", precision="fp32",
                        out_dir=tmp_path / "cache", progress=False, workers=0)
    path = extract(load_dataset(data), cfg).path
    out = tmp_path / "results"
    fit_heads([path], HeadsConfig(heads=("logistic", "linear"), features=("all",), seed=0,
                                  out_dir=out))
    jsons = sorted(out.rglob("heads/*.json"))
    results = [json.loads(p.read_text()) for p in jsons]
    fitted = {(r["feature"], r["head"]) for r in results}
    # every stored layer x pool once; pool1 is penultimate's alias, so not fitted twice
    features = {"penultimate", "pool2", "layer2.pool1", "layer2.pool2", "layer3.pool1",
                "layer3.pool2"}
    assert fitted == {(f, h) for f in features for h in ("logistic", "linear")}
    report = write_report(out)
    assert "layers.png" in {Path(p).name for p in report["plot"]}
    md = open(report["markdown"]).read()
    assert "![layers](layers.png)" in md
    # the best layer per head, worked out here from the result files themselves
    for head in ("logistic", "linear"):
        mine = [r for r in results if r["head"] == head]
        best = max(mine, key=lambda r: (r["metrics"]["balanced_accuracy"],
                                        -["layer2", "layer3", ""].index(
                                            r["feature"].rpartition(".")[0])))
        layer = best["feature"].rpartition(".")[0] or LAST_MAP
        assert f"- {head} / resnet18: **{layer}**" in md, md


def test_best_layer_is_the_highest_point_and_the_shallower_on_a_tie():
    def row(feature, head, value):
        return {"kind": "head", "feature": feature, "model": "m", "test_balanced_accuracy":
                value, "result": {"head": head, "provenance": {"layers": ["a", "b"]}}}
    rows = [row("a.pool1", "h", 0.7), row("a.pool2", "h", 0.9), row("b.pool1", "h", 0.9),
            row("pool2", "h", 0.8), row("penultimate", "g", 0.6), row("b.pool1", "g", 0.5)]
    lines = layer_lines(rows)
    assert lines["h / m"]["depth"] == ["a", "b", LAST_MAP]
    assert lines["h / m"]["points"] == {"a": (0.9, "a.pool2"), "b": (0.9, "b.pool1"),
                                        LAST_MAP: (0.8, "pool2")}
    assert best_layers(lines) == {"h / m": ("a", "a.pool2", 0.9),
                                  "g / m": (LAST_MAP, "penultimate", 0.6)}
    # results of a cache without layers draw nothing
    assert layer_lines([{**rows[0], "result": {"head": "h", "provenance": {}}}]) == {}


def test_each_layer_point_carries_the_interval_of_its_chosen_feature():
    """The layer-wise plot draws a layer's 95% interval: that of the feature whose point it
    draws (the layer's best), and none where the row has no interval (results without
    per-image outputs)."""
    def row(feature, value, lo=None, hi=None):
        r = {"kind": "head", "feature": feature, "model": "m", "test_balanced_accuracy": value,
             "result": {"head": "h", "provenance": {"layers": ["a"]}}}
        if lo is not None:
            r.update(test_balanced_accuracy_lo=lo, test_balanced_accuracy_hi=hi)
        return r
    lines = layer_lines([row("a.pool1", 0.7, 0.6, 0.8), row("a.pool2", 0.9, 0.85, 0.95),
                         row("pool2", 0.8)])
    assert lines["h / m"]["intervals"] == {"a": (0.85, 0.95)}
    # a better feature without an interval replaces the point and drops the old interval
    lines = layer_lines([row("a.pool2", 0.9, 0.85, 0.95), row("a.pool1", 0.95)])
    assert lines["h / m"]["intervals"] == {}
