"""Re-running a finished command does no work: no model is built, no weights file is read,
no head is fitted, nothing is drawn, and sklearn is not even imported where not needed.

Behaviour, not timing: the expensive steps are replaced by functions that fail, and the
re-run must still succeed and say that everything is up to date.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner

import featx.backbones as backbones
import featx.backbones.frozen as frozen_mod
import featx.backbones.weights as weights_mod
import featx.heads.task as heads_task
from featx.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _boom(*args, **kwargs):
    raise AssertionError("a no-op re-run must not get here")


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mnv2.pth"
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), path)
    return path


def _extract(digits_dir, weights, out):
    return CliRunner().invoke(main, [
        "extract", "--model", "mobilenet_v2", "--data", str(digits_dir), "--weights",
        str(weights), "--image-size", "32", "--workers", "0", "--pool", "1,2",
        "--out", str(out), "--no-progress"])


def test_extract_rerun_builds_nothing_and_hashes_the_weights_once(digits_dir, weights_file,
                                                                   tmp_path, monkeypatch):
    first = _extract(digits_dir, weights_file, tmp_path / "cache")
    assert first.exit_code == 0, first.output
    # a new process: nothing memoised in memory, only the on-disk memo beside the hub
    monkeypatch.setattr(weights_mod, "_HASH_MEMO", {})
    monkeypatch.setattr(frozen_mod, "build_backbone", _boom)
    monkeypatch.setattr(weights_mod, "_hash_file", _boom)
    again = _extract(digits_dir, weights_file, tmp_path / "cache")
    assert again.exit_code == 0, again.output
    assert "up to date, nothing to do" in again.output

    # the same bytes written again: the file's identity changed, so it is hashed again
    calls = []
    monkeypatch.setattr(weights_mod, "_hash_file",
                        lambda p: calls.append(p) or weights_mod.hashlib.sha256(
                            Path(p).read_bytes()).hexdigest())
    weights_file.write_bytes(weights_file.read_bytes())
    third = _extract(digits_dir, weights_file, tmp_path / "cache")
    assert third.exit_code == 0 and "up to date" in third.output, third.output
    assert len(calls) == 1

    # other weights under the same path: a new hash, so a new cache, never "up to date"
    torch.manual_seed(1)
    torch.save(torchvision.models.mobilenet_v2(weights=None).state_dict(), weights_file)
    monkeypatch.setattr(frozen_mod, "build_backbone", backbones.build_backbone)
    fourth = _extract(digits_dir, weights_file, tmp_path / "cache")
    assert fourth.exit_code == 0 and "up to date" not in fourth.output, fourth.output
    assert len(list((tmp_path / "cache").glob("*.h5"))) == 2


def test_weights_hash_memo_survives_a_damaged_memo_file(weights_file, monkeypatch):
    memo = Path(torch.hub.get_dir()) / weights_mod._HASH_MEMO_FILE
    monkeypatch.setattr(weights_mod, "_HASH_MEMO", {})
    digest = weights_mod._sha256(weights_file)
    assert digest == weights_mod.hashlib.sha256(weights_file.read_bytes()).hexdigest()
    memo.write_text("{not json")
    monkeypatch.setattr(weights_mod, "_HASH_MEMO", {})
    assert weights_mod._sha256(weights_file) == digest  # recomputed, not an error


def _fit(cache, out, *extra):
    return CliRunner().invoke(main, ["fit-heads", str(cache), "--heads", "logistic,linear",
                                     "--features", "all", "--jobs", "1", "--out", str(out),
                                     *extra])


def test_fit_heads_rerun_reuses_current_results_and_refits_when_asked(
        digits_dir, weights_file, tmp_path, monkeypatch):
    assert _extract(digits_dir, weights_file, tmp_path / "cache").exit_code == 0
    cache = next((tmp_path / "cache").glob("*.h5"))
    out = tmp_path / "res"
    first = _fit(cache, out)
    assert first.exit_code == 0, first.output
    jsons = sorted(out.rglob("*__*.json"))
    # penultimate, pool2 x logistic, linear (pool1 is penultimate, stored and fitted once)
    assert len(jsons) == 4
    before = {p: p.stat().st_mtime_ns for p in jsons}
    scores = {p: json.loads(p.read_text())["metrics"]["balanced_accuracy"] for p in jsons}

    monkeypatch.setattr(heads_task, "select_and_fit", _boom)
    again = _fit(cache, out)
    assert again.exit_code == 0, again.output
    assert "4 of 4 result(s) are current" in again.output
    assert {p: p.stat().st_mtime_ns for p in jsons} == before  # nothing rewritten
    # the printed summary still carries the stored numbers
    for p, score in scores.items():
        assert f"{score:.3f}" in again.output

    # another seed, or --refit: the heads are fitted again
    for extra in (["--seed", "1"], ["--refit"]):
        res = _fit(cache, out, *extra)
        assert res.exit_code != 0 and "a no-op re-run must not get here" in repr(res.exception)


def test_noop_extract_and_compare_import_no_sklearn_and_draw_nothing(digits_dir, weights_file,
                                                                     tmp_path):
    """In a fresh interpreter, as a user runs it: a re-run of a finished `extract` and
    `compare` imports neither sklearn nor matplotlib, and rewrites no file."""
    common = ["--data", str(digits_dir), "--weights", str(weights_file), "--image-size", "32",
              "--workers", "0", "--no-progress"]
    compare = ["compare", "--models", "mobilenet_v2", "--pool", "1", "--heads", "logistic",
               "--finetune", "none", "--cache-dir", str(tmp_path / "cache"),
               "--out", str(tmp_path / "res"), *common]
    extract = ["extract", "--model", "mobilenet_v2", "--pool", "1",
               "--out", str(tmp_path / "cache"), *common]
    assert CliRunner().invoke(main, compare).exit_code == 0
    files = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    script = ("import sys, json\nfrom featx.cli import main\nout = {}\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    try:\n        main(args, standalone_mode=False)\n"
              "    finally:\n        out[args[0]] = sorted(m for m in ('sklearn', 'matplotlib',"
              " 'scipy') if m in sys.modules)\n"
              "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")])}
    r = subprocess.run([sys.executable, "-c", script, json.dumps([extract, compare])],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "up to date, nothing to do" in r.stderr
    assert "heads on" in r.stderr and "up to date" in r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded == {"extract": [], "compare": []}
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == files
    assert "logistic @ penultimate" in r.stdout  # the ranking is still printed
