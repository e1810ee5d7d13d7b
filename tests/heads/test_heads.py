"""Heads on cached features: learning, selection on val only, persistence, parallel
determinism, the large-feature path, and one-line errors for bad input."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx.cache import Cache
from featx.cli import main
from featx.config import HeadsConfig
from featx.heads import (
    build_head,
    class_scores,
    fit_heads,
    get_head,
    list_heads,
    load_head,
    select_and_fit,
)
from featx.heads.outofcore import STREAM_EPOCHS
from featx.results import read_result
from tests.builders import (
    CROSS_ATOL,
    CROSS_RTOL,
    assert_close_results,
    blob_splits,
    blobs,
    comparable_results,
    invoke_cli,
    write_cache,
)

# --- building real caches with known structure --------------------------------------------


@pytest.fixture
def blob_cache(tmp_path):
    return write_cache(tmp_path / "blobs_synthetic.h5", blob_splits())


def run_cli(*args):
    return invoke_cli("fit-heads", *args)


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


# --- learning ------------------------------------------------------------------------------

@pytest.mark.parametrize("head", list_heads())
def test_each_head_learns_separable_features(head):
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 16)) * 1.5
    (Xtr, ytr), (Xva, yva), (Xte, yte) = (blobs(rng, n, centers) for n in (40, 20, 100))
    model, selection, _ = select_and_fit(head, Xtr, ytr, Xva, yva, seed=0)
    assert selection["on"] == "val" and selection["chosen"]
    assert balanced_accuracy_score(yte, model.predict(Xte)) > 0.9


def test_every_head_is_at_chance_when_labels_carry_no_information(tmp_path):
    """Labels permuted in every split: whatever a head learns, nothing reaches the test
    labels unless the test split leaks into fitting or selection."""
    rng = np.random.default_rng(2)
    splits = blob_splits(d=16, n=(40, 20, 100), pools=())
    for split, (feats, y) in splits.items():
        splits[split] = (feats, rng.permutation(y))
    path = write_cache(tmp_path / "shuffled.h5", splits)
    run = fit_heads([path], HeadsConfig(heads=tuple(list_heads()), out_dir=tmp_path / "r"))
    assert [r["head"] for r in run.rows] == list_heads()
    for row in run.rows:
        assert abs(row["test_balanced_accuracy"] - 1 / 3) < 0.12, row["head"]


def test_val_not_test_decides_hyperparameters(tmp_path):
    """k-NN on noisy train labels: clean val prefers smoothing (large k); the test split is
    the train points with their noisy labels, where k=1 would be perfect. Peeking at test
    would pick k=1; selection must pick from val."""
    rng = np.random.default_rng(0)
    centers = np.array([[-2.0, 0.0], [2.0, 0.0]])
    Xtr, ytr_clean = blobs(rng, 100, centers, noise=0.8)
    ytr = np.where(rng.random(len(ytr_clean)) < 0.3, 1 - ytr_clean, ytr_clean)
    Xva, yva = blobs(rng, 60, centers, noise=0.8)
    Xte, yte = Xtr.copy(), ytr.copy()
    path = write_cache(tmp_path / "noisy.h5", {"train": ({"penultimate": Xtr}, ytr),
                                               "val": ({"penultimate": Xva}, yva),
                                               "test": ({"penultimate": Xte}, yte)},
                       classes=["a", "b"])
    run = fit_heads([path], HeadsConfig(heads=("knn",), out_dir=tmp_path / "r"))
    sel = run.results[0]["selection"]
    assert sel["on"] == "val" and sel["chosen"] == {"n_neighbors": 15}

    def scores_on(X, y):
        return {k: balanced_accuracy_score(y, make_pipeline(
            StandardScaler(), KNeighborsClassifier(k)).fit(Xtr, ytr).predict(X))
            for k in (15, 5, 1)}
    on_val, on_test = scores_on(Xva, yva), scores_on(Xte, yte)
    assert max(on_test, key=on_test.get) == 1  # what peeking at test would choose
    assert {g["params"]["n_neighbors"]: g["score"] for g in sel["grid"]} == pytest.approx(on_val)
    assert run.results[0]["metrics"]["balanced_accuracy"] == pytest.approx(on_test[15])
    assert run.results[0]["metrics"]["val_balanced_accuracy"] == pytest.approx(on_val[15])


def test_knn_searches_only_neighbour_counts_a_fit_can_take():
    rng = np.random.default_rng(3)
    X, y = blobs(rng, 6, np.array([[-3.0, 0.0], [3.0, 0.0]]), noise=0.3)  # 12 rows
    assert get_head("knn").grid_for(6) == {"n_neighbors": [5, 1]}
    assert get_head("knn").grid_for(0) == {"n_neighbors": [1]}
    # 2-fold CV fits on 6 rows: k=15 would make sklearn raise
    model, sel, _ = select_and_fit("knn", X, y, select="cv", cv=2)
    assert [g["params"]["n_neighbors"] for g in sel["grid"]] == [5, 1]
    assert balanced_accuracy_score(y, model.predict(X)) == 1.0


def test_without_a_val_split_selection_is_stratified_cv_on_train(tmp_path):
    path = write_cache(tmp_path / "noval.h5", blob_splits(val=False, pools=()))
    res = ok(run_cli(path, "--heads", "linear", "--cv", "3", "--jobs", "1",
                     "--out", tmp_path / "r"))
    assert "no val split" in res.output and "3-fold stratified CV" in res.output
    result = read_result(tmp_path / "r" / "noval" / "heads" / "penultimate__linear.json")
    sel = result["selection"]
    assert sel["on"] == "cv" and sel["folds"] == 3 and "val_accuracy" not in result["metrics"]
    cache = Cache(path)
    X, y = cache.load("train", "penultimate"), cache.labels("train")
    for point in sel["grid"]:
        expected = cross_val_score(build_head("linear", params=point["params"]), X, y,
                                   scoring="balanced_accuracy",
                                   cv=StratifiedKFold(3, shuffle=True, random_state=0)).mean()
        assert point["score"] == pytest.approx(expected)


# --- outputs -------------------------------------------------------------------------------

def test_results_json_csv_matrix_and_plot_from_a_real_extraction(digits_split_dir, tmp_path):
    """End to end: featx extract (random resnet18, small images) then fit-heads on all pools."""
    runner = CliRunner()
    ext = runner.invoke(main, ["extract", "--model", "resnet18", "--weights", "none",
                               "--data", str(digits_split_dir), "--pool", "1,2",
                               "--image-size", "64", "--workers", "0", "--no-progress",
                               "--out", str(tmp_path / "cache")])
    assert ext.exit_code == 0, ext.output
    cache_path = Path(ext.stdout.strip().splitlines()[-1])
    out = tmp_path / "results"
    res = ok(run_cli(cache_path, "--features", "all", "--heads", "linear,svm",
                     "--class-weight", "balanced", "--jobs", "1", "--out", out))

    csv = pd.read_csv(out / "heads_summary.csv")
    # resnet18's pool1 is its penultimate: stored once, so fitted once
    assert len(csv) == 4 and set(csv["feature"]) == {"penultimate", "pool2"}
    assert {"dataset", "model", "feature", "head", "test_accuracy", "test_balanced_accuracy",
            "test_macro_f1", "test_roc_auc", "val_score", "fit_s", "json"} <= set(csv.columns)
    for row in csv.itertuples():
        with open(out / row.json) as f:
            result = json.load(f)
        assert read_result(out / row.json)["kind"] == "head"
        assert result["method"] == f"{row.head} @ {row.feature}"
        assert result["model"] == "resnet18" and result["dataset"]["name"] == "digits_split"
        m = result["metrics"]
        assert m["balanced_accuracy"] == pytest.approx(row.test_balanced_accuracy)
        assert m["val_balanced_accuracy"] == pytest.approx(result["selection"]["score"])
        assert {"accuracy", "macro_f1", "roc_auc", "per_class_recall", "confusion_matrix",
                "val_accuracy", "fit_s", "predict_s"} <= set(m)
        assert set(result["timings"]) >= {"fit_s", "predict_s", "extract_s", "total_s"}
        assert result["timings"]["extract_s"] == Cache(cache_path).attrs["timings"]["seconds"]
        assert result["selection"]["on"] == "val" and result["settings"]["refit"] == "train"
        assert result["settings"]["class_weight"] == "balanced"
        assert result["dataset"]["test_fingerprint"] == Cache(cache_path).dataset_info()[
            "test_fingerprint"]
        assert (out / row.json).with_suffix(".skops").is_file()
    assert (out / cache_path.stem / "pool_sizes.png").stat().st_size > 1000
    table = res.stdout.splitlines()  # its order: test_printed_table_is_sorted_by_...
    rows = table[1:1 + len(csv)]
    assert {tuple(line.split()[2:4]) for line in rows} == set(zip(csv["feature"], csv["head"]))
    assert "test balanced accuracy (val accuracy)" in res.stdout
    assert any(line.startswith("pool2") for line in table)


def test_persisted_head_reloads_and_gives_the_same_predictions(blob_cache, tmp_path):
    out = tmp_path / "r"
    ok(run_cli(blob_cache, "--heads", "logistic,svm", "--features", "pool2", "--jobs", "1",
               "--out", out))
    cache = Cache(blob_cache)
    X, y = cache.load("test", "pool2"), cache.labels("test")
    for head in ("logistic", "svm"):
        path = out / "blobs_synthetic" / "heads" / f"pool2__{head}.json"
        model = load_head(path)
        pred = model.predict(X)
        assert confusion_matrix(y, pred).tolist() == read_result(path)["metrics"][
            "confusion_matrix"]
        again = load_head(path.with_suffix(".skops"))
        np.testing.assert_array_equal(again.predict(X), pred)


def test_results_are_the_same_with_one_and_two_jobs(blob_cache, tmp_path):
    """--jobs 2 fits in loky worker processes: the same results to CROSS_RTOL (float32
    reductions with another BLAS thread split); counts and choices exactly."""
    for jobs in (1, 2):
        ok(run_cli(blob_cache, "--heads", "svm,mlp", "--features", "penultimate,pool1",
                   "--jobs", jobs, "--out", tmp_path / f"j{jobs}"))
    files = sorted((tmp_path / "j1" / "blobs_synthetic" / "heads").glob("*.json"))
    assert len(files) == 4
    X = Cache(blob_cache).load("test", "pool1")
    for f1 in files:
        f2 = tmp_path / "j2" / "blobs_synthetic" / "heads" / f1.name
        r1, r2 = read_result(f1), read_result(f2)
        for r in (r1, r2):
            for key in ("fit_s", "select_s", "predict_s"):
                r["metrics"].pop(key)
        assert_close_results(r2["metrics"], r1["metrics"])
        assert_close_results(r2["selection"], r1["selection"])
        if f1.stem == "pool1__mlp":  # fitted in another process: last-bit differences only
            np.testing.assert_allclose(load_head(f2).predict_proba(X),
                                       load_head(f1).predict_proba(X),
                                       rtol=CROSS_RTOL, atol=CROSS_ATOL)


def test_two_fits_in_one_process_with_the_same_threads_are_bit_identical(blob_cache, tmp_path):
    """What featx does guarantee exactly: the same run twice in the same process, with the
    same thread count, gives bit-equal results and probabilities."""
    for k in (1, 2):
        ok(run_cli(blob_cache, "--heads", "mlp,logistic", "--features", "pool1", "--jobs", "1",
                   "--out", tmp_path / f"r{k}"))
    assert comparable_results(tmp_path / "r1") == comparable_results(tmp_path / "r2")
    X = Cache(blob_cache).load("test", "pool1")
    for head in ("mlp", "logistic"):
        name = Path("blobs_synthetic", "heads", f"pool1__{head}.json")
        np.testing.assert_array_equal(load_head(tmp_path / "r2" / name).predict_proba(X),
                                      load_head(tmp_path / "r1" / name).predict_proba(X))


# --- features too large for memory ---------------------------------------------------------

def test_features_too_large_for_memory_are_streamed_and_still_learn(tmp_path):
    path = write_cache(tmp_path / "big.h5", blob_splits(d=64, n=(80, 20, 40), pools=(2,)))
    out = tmp_path / "r"
    res = ok(run_cli(path, "--features", "pool2", "--memory-limit-mb", "0.25", "--jobs", "1",
                     "--out", out))
    assert "streaming instead" in res.stderr and "SGDClassifier(log_loss)" in res.stderr
    result = read_result(out / "big" / "heads" / "pool2__sgd.json")
    assert result["settings"]["memory"]["mode"] == "stream"
    assert result["settings"]["replaces_heads"] == ["linear", "logistic", "svm", "mlp"]
    assert result["method"] == "sgd @ pool2 [streamed]"
    assert result["metrics"]["balanced_accuracy"] > 0.8
    assert result["selection"]["on"] == "val"
    X = Cache(path).load("test", "pool2")
    assert load_head(out / "big" / "heads" / "pool2__sgd.json").predict_proba(X).shape == (120, 3)


def test_features_too_large_with_pca_are_reduced_on_train_first(tmp_path, monkeypatch):
    path = write_cache(tmp_path / "big.h5", blob_splits(d=64, n=(80, 20, 40), pools=(2,),
                                                        val=False))
    monkeypatch.setenv("FEATX_MEMORY_LIMIT_MB", "0.25")
    out = tmp_path / "r"
    res = ok(run_cli(path, "--features", "pool2", "--heads", "logistic", "--pca", "8",
                     "--cv", "3", "--jobs", "1", "--out", out))
    assert "reduced to 8 PCA components" in res.stderr
    result = read_result(out / "big" / "heads" / "pool2__logistic.json")
    assert result["settings"]["memory"]["mode"] == "pca"
    assert result["settings"]["memory"]["limit_source"].startswith("--memory-limit-mb")
    assert result["metrics"]["balanced_accuracy"] > 0.8
    model = load_head(out / "big" / "heads" / "pool2__logistic.json")
    assert model.named_steps["pca"].n_components_ == 8
    X = Cache(path).load("test", "pool2")  # the saved pipeline takes the raw 256-d rows
    pred = model.predict(X)
    assert balanced_accuracy_score(Cache(path).labels("test"), pred) == pytest.approx(
        result["metrics"]["balanced_accuracy"])


# --- bad input: one line each ---------------------------------------------------------------

def _plain_h5(tmp_path):
    p = tmp_path / "plain.h5"
    with h5py.File(p, "w") as f:
        f["train/penultimate"] = np.zeros((4, 2))
    return p


def _text_file(tmp_path):
    p = tmp_path / "notes.h5"
    p.write_text("not a cache\n")
    return p


def _partial(tmp_path):
    return write_cache(tmp_path / "part.h5", blob_splits(pools=()), finish=False)


def _partial_by_final_name(tmp_path):
    _partial(tmp_path)
    return tmp_path / "part.h5"


def _marked_incomplete(tmp_path):
    p = _partial(tmp_path)
    target = tmp_path / "incomplete.h5"
    p.rename(target)
    return target


def _single_class_train(tmp_path):
    splits = blob_splits(pools=())
    feats, y = splits["train"]
    splits["train"] = (feats, np.zeros_like(y))
    return write_cache(tmp_path / "one.h5", splits)


@pytest.mark.parametrize("make, args, words", [
    (_partial, (), "unfinished extraction"),
    (_partial_by_final_name, (), "not finished"),
    (_marked_incomplete, (), "marked incomplete"),
    (_plain_h5, (), "not a featx cache"),
    (_text_file, (), "not an HDF5 file"),
    (None, ("--features", "pool7"), "has no feature 'pool7'; it has penultimate, pool1, pool2"),
    (_single_class_train, (), "single class"),
    (None, ("--heads", "linear,forest"), "unknown head 'forest'; available heads: linear"),
])
def test_bad_input_gives_one_clear_line(tmp_path, blob_cache, make, args, words):
    path = make(tmp_path) if make else blob_cache
    res = run_cli(path, *args, "--jobs", "1", "--out", tmp_path / "r")
    assert res.exit_code != 0
    assert res.output.startswith("Error:") and words in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()  # checked before any fit


def test_class_absent_from_test_warns_once_and_reports_null(tmp_path):
    splits = blob_splits(pools=())
    feats, y = splits["test"]
    keep = y != 2
    splits["test"] = ({k: v[keep] for k, v in feats.items()}, y[keep])
    path = write_cache(tmp_path / "absent.h5", splits)
    res = ok(run_cli(path, "--heads", "linear,mlp", "--class-weight", "balanced", "--jobs", "1",
                     "--out", tmp_path / "r"))
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: absent.h5: class(es) gamma absent from the test split; their "
                        "recall and ROC-AUC are reported as null."]
    assert "mlp does not support class weights" in res.stderr
    m = read_result(tmp_path / "r" / "absent" / "heads" / "penultimate__linear.json")["metrics"]
    assert m["roc_auc"] is None and "2 of 3 classes" in m["roc_auc_note"]
    assert m["per_class_recall"]["gamma"] is None and m["balanced_accuracy"] > 0.9


# --- backends and a killed run -------------------------------------------------------------

def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has stopped running


def _cpu_seconds(pid: int) -> float:
    stat = _proc_stat(pid)
    return 0.0 if stat is None else (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def _loky_workers(parent: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        stat = _proc_stat(int(name)) if name.isdigit() else None
        if stat is not None and int(stat[1]) == parent:
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:
                continue
            if b"loky" in cmd and b"resource_tracker" not in cmd:
                pids.append(int(name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killing_fit_heads_kills_its_workers_and_writes_nothing_after(tmp_path):
    """kill -9 of the parent: its loky workers are gone within seconds (they used to fit
    on for minutes and write results), and no result file appears after the kill."""
    # ~55 s of fitting on 2 cores: the kill comes a few seconds in, so the size only
    # has to outlast the workers' start on a fast machine (600 rows of d=64 did not)
    path = write_cache(tmp_path / "slow.h5", blob_splits(d=128, n=(4000, 400, 100),
                                                          pools=(1, 2, 4)))
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    log = open(tmp_path / "log.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from featx.cli import main; main()", "fit-heads", str(path),
         "--heads", "mlp", "--features", "all", "--jobs", "2", "--out", str(out)],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(workers := _loky_workers(proc.pid)) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()
            time.sleep(0.2)
        assert len(workers) >= 2, "no loky workers started"
        # past their imports (~1-2 s of CPU) and into their fits
        while (min(map(_cpu_seconds, workers)) < 3.0 and time.monotonic() < deadline
               and proc.poll() is None):
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before the kill: give it more work"
    finally:
        killed_at = time.time()
        proc.kill()
        proc.wait()
        log.close()
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "workers outlived their parent"
    time.sleep(0.5)
    late = [p for p in out.rglob("*") if p.is_file() and p.stat().st_mtime > killed_at]
    assert not late, late
    for result in out.rglob("*.json"):  # whatever was finished is whole
        assert load_head(result) is not None and read_result(result)["kind"] == "head"


def test_dask_cluster_gives_the_results_of_one_job_and_runs_every_fit_there(tmp_path):
    """A dask cluster given by --scheduler runs the (feature, head) runs and their grid
    points; one started by featx (no --scheduler) too. Both give --jobs 1's results, floats
    to CROSS_RTOL: a worker process (or thread) sums float32 in its own BLAS thread split
    (1.2e-7 apart on an AVX2-only machine); counts and chosen parameters exactly.
    pool2 is over the memory limit, so its PCA-reduced rows travel to the workers."""
    distributed = pytest.importorskip("distributed")
    path = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(pools=(2,)))
    memory = ("--features", "penultimate,pool2", "--pca", "8", "--memory-limit-mb", "0.1")
    args = ("--heads", "logistic,mlp", *memory)
    ok(run_cli(path, *args, "--jobs", "1", "--out", tmp_path / "j1"))
    expected = comparable_results(tmp_path / "j1")
    assert len(expected) == 4
    assert [read_result(tmp_path / "j1" / "blobs_synthetic" / "heads" / f"{f}__mlp.json")[
        "settings"]["memory"]["mode"] for f in ("penultimate", "pool2")] == ["memory", "pca"]

    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client, \
            distributed.get_task_stream(client) as stream:
        res = ok(run_cli(path, *args, "--backend", "dask", "--scheduler",
                         cluster.scheduler_address, "--out", tmp_path / "dask"))
    assert_close_results(comparable_results(tmp_path / "dask"), expected)
    ran = [t["key"] if isinstance(t["key"], str) else str(t["key"]) for t in stream.data]
    assert sum("run_indexed" in k for k in ran) == 4  # every (feature, head) run
    assert sum("_fit_and_score" in k for k in ran) >= 4  # grid points went back to dask
    assert "4 result(s)" in res.stderr

    # featx's own LocalCluster of --jobs worker processes: the mlp, seeded, crosses processes
    ok(run_cli(path, "--heads", "mlp", *memory, "--backend", "dask", "--jobs", "2",
               "--out", tmp_path / "local"))
    assert_close_results(comparable_results(tmp_path / "local"),
                         {k: v for k, v in expected.items() if "mlp" in k})
    for feature in ("penultimate", "pool2"):
        mlp = Path("blobs_synthetic", "heads", f"{feature}__mlp.json")
        X = Cache(path).load("test", feature)
        np.testing.assert_allclose(load_head(tmp_path / "local" / mlp).predict_proba(X),
                                   load_head(tmp_path / "j1" / mlp).predict_proba(X),
                                   rtol=CROSS_RTOL, atol=CROSS_ATOL)  # another process


def test_ray_gives_the_results_of_one_job(tmp_path):
    pytest.importorskip("ray")
    path = write_cache(tmp_path / "blobs_synthetic.h5", blob_splits(pools=()))
    args = ("--heads", "logistic", "--features", "penultimate")
    ok(run_cli(path, *args, "--jobs", "1", "--out", tmp_path / "j1"))
    ok(run_cli(path, *args, "--backend", "ray", "--jobs", "2", "--out", tmp_path / "ray"))
    # ray workers are other processes: floats to CROSS_RTOL, counts and choices exactly
    assert_close_results(comparable_results(tmp_path / "ray"), comparable_results(tmp_path / "j1"))


@pytest.mark.parametrize("args, hidden, words", [
    (("--scheduler", "tcp://127.0.0.1:8786"), None,
     "--scheduler tcp://127.0.0.1:8786: loky runs on this machine only"),
    (("--backend", "dask"), "distributed",
     "--backend dask needs the dask package: pip install featx[dask]"),
    (("--backend", "ray"), "ray", "--backend ray needs the ray package: pip install featx[ray]"),
    (("--backend", "dask", "--scheduler", "tcp://127.0.0.1:9"), None,
     "--scheduler tcp://127.0.0.1:9: no dask scheduler answers there"),
])
def test_bad_backend_gives_one_clear_line(tmp_path, blob_cache, monkeypatch, args, hidden,
                                          words):
    wait = contextlib.nullcontext()
    if hidden:
        monkeypatch.setitem(sys.modules, hidden, None)  # as if not installed
    elif "--backend" in args:  # a scheduler nobody answers at: give up after 1 s, not 30
        dask = pytest.importorskip("dask")
        pytest.importorskip("distributed")
        wait = dask.config.set({"distributed.comm.timeouts.connect": "1s"})
    with wait:
        res = run_cli(blob_cache, "--heads", "linear", *args, "--out", tmp_path / "r")
    assert res.exit_code != 0
    assert res.output.startswith("Error:") and words in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()


# --- contracts: scores, class weights, what is fitted on which rows, ties -------------------

def _binary_cache(tmp_path, *, n=(60, 30, 80), sep=1.2, ratio=1, name="binary.h5", d=8,
                  val=True):
    """Two overlapping classes; ``ratio``: how many times more class 0 than class 1 rows
    in train and val (test stays balanced)."""
    rng = np.random.default_rng(5)
    centers = np.zeros((2, d))
    centers[1, 0] = sep
    splits = {}
    for split, k in zip(("train", "val", "test"), n):
        if split == "val" and not val:
            continue
        X, y = blobs(rng, k, centers)
        if ratio > 1 and split != "test":
            keep = (y == 0) | (np.arange(len(y)) % ratio == 0)
            X, y = X[keep], y[keep]
        splits[split] = ({"penultimate": X}, y)
    return write_cache(tmp_path / name, splits, classes=["neg", "pos"])


def test_roc_auc_comes_from_scores_with_the_positive_class_up(tmp_path):
    """Binary heads: ROC-AUC is sklearn's on the positive-class score (decision function
    for linear/svm, probability for logistic), not on hard labels and not sign-flipped."""
    path = _binary_cache(tmp_path)
    run = fit_heads([path], HeadsConfig(heads=("linear", "svm", "logistic"),
                                        out_dir=tmp_path / "r"))
    cache = Cache(path)
    X, y = cache.load("test", "penultimate"), cache.labels("test")
    for result, json_path in zip(run.results, run.json_paths):
        model = load_head(json_path)
        score = (model.predict_proba(X)[:, 1] if result["head"] == "logistic"
                 else model.decision_function(X))
        assert score.ndim == 1
        expected = roc_auc_score(y, score)
        hard = roc_auc_score(y, model.predict(X))
        assert abs(expected - hard) > 0.02 and expected > 0.7, result["head"]  # the data tells
        assert result["metrics"]["roc_auc"] == pytest.approx(expected), result["head"]


def test_multiclass_roc_auc_comes_from_decision_scores(blob_cache, tmp_path):
    run = fit_heads([blob_cache], HeadsConfig(heads=("linear",), features=("pool2",),
                                              out_dir=tmp_path / "r"))
    cache = Cache(blob_cache)
    X, y = cache.load("test", "pool2"), cache.labels("test")
    model = load_head(run.json_paths[0])
    z = model.decision_function(X)
    soft = np.exp(z - z.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    expected = roc_auc_score(y, soft, multi_class="ovr")
    one_hot = np.eye(3)[model.predict(X)]
    assert abs(expected - roc_auc_score(y, one_hot, multi_class="ovr")) > 1e-3
    assert run.results[0]["metrics"]["roc_auc"] == pytest.approx(expected)


@pytest.mark.parametrize("head", list_heads())
def test_class_scores_rank_the_predicted_class_first_even_with_a_class_unseen(head):
    """argmax of the scores is the prediction, for every head, also when train lacks one
    of three classes (a 2-class decision function is then spread over three columns)."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(3, 6)) * 1.5
    X, y = blobs(rng, 30, centers, noise=1.5)
    for train_rows in (np.ones(len(y), bool), y != 1):  # all classes; class 1 never seen
        model = build_head(head).fit(X[train_rows], y[train_rows])
        s = class_scores(model, X, 3)
        pred = model.predict(X)
        if s.ndim == 1:
            np.testing.assert_array_equal(pred, (s > 0).astype(int))
        else:
            assert s.shape == (len(y), 3)
            np.testing.assert_array_equal(pred, s.argmax(1))
            if not train_rows.all():  # never above a seen class (probabilities: 0)
                assert (s[:, 1] <= np.delete(s, 1, axis=1).min(1)).all()


def test_class_weight_balanced_reaches_the_estimators_and_the_streamed_fit(tmp_path):
    """9:1 imbalanced train: balanced weights must be on every fitted estimator that takes
    them, and must raise the minority class's recall, in memory and when streamed."""
    path = _binary_cache(tmp_path, n=(200, 100, 100), sep=1.0, ratio=9)
    recall = {}
    for cw in ("none", "balanced"):
        for extra in ((), ("--memory-limit-mb", "0.002")):
            out = tmp_path / f"{cw}{len(extra)}"
            ok(run_cli(path, "--heads", "linear,logistic,svm", "--class-weight", cw,
                       "--jobs", "1", "--out", out, *extra))
            for result_path in sorted(out.rglob("*.json")):
                result = read_result(result_path)
                recall[cw, result["head"]] = result["metrics"]["per_class_recall"]["pos"]
                est = load_head(result_path).named_steps["head"]
                if result["head"] != "sgd":
                    assert est.class_weight == (None if cw == "none" else "balanced")
    assert set(recall) == {(cw, h) for cw in ("none", "balanced")
                           for h in ("linear", "logistic", "svm", "sgd")}
    for head in ("linear", "logistic", "svm", "sgd"):
        assert recall["balanced", head] > recall["none", head] + 0.1, (head, recall)


def _shifted_splits(d=32, n=(40, 15, 30), val=True):
    """Blobs whose val and test rows sit 50 units away from train in every feature: a
    scaler or PCA that saw them would have means nowhere near train's."""
    splits = blob_splits(d=d, n=n, val=val, pools=(2,))
    for split in ("val", "test"):
        if split in splits:
            feats, y = splits[split]
            splits[split] = ({k: v + 50.0 for k, v in feats.items()}, y)
    return splits


@pytest.mark.parametrize("mode", ["memory", "pca", "stream"])
def test_scaler_and_pca_are_fitted_on_train_rows_only(tmp_path, mode):
    path = write_cache(tmp_path / "shifted.h5", _shifted_splits())
    extra = {"memory": (), "pca": ("--pca", "6", "--memory-limit-mb", "0.05"),
             "stream": ("--memory-limit-mb", "0.05")}[mode]
    out = tmp_path / "r"
    ok(run_cli(path, "--heads", "logistic", "--features", "pool2", "--jobs", "1",
               "--out", out, *extra))
    (result_path,) = out.rglob("*.json")
    assert read_result(result_path)["settings"]["memory"]["mode"] == mode
    model = load_head(result_path)
    X = Cache(path).load("train", "pool2")
    scaler = model.named_steps["prescale" if mode == "pca" else "scaler"]
    assert scaler.n_samples_seen_ == len(X)
    np.testing.assert_allclose(scaler.mean_, X.mean(0), atol=1e-4)
    if mode == "pca":
        pca = model.named_steps["pca"]
        assert pca.n_samples_seen_ == len(X)
        np.testing.assert_allclose(pca.mean_, 0.0, atol=1e-4)  # train, standardised


def test_ties_go_to_the_most_regularised_grid_point(tmp_path):
    """Classes far apart: every grid point is perfect on val, so each head must keep the
    first (most regularised) point of its grid, in memory and streamed."""
    path = write_cache(tmp_path / "easy.h5", blob_splits(d=8, sep=40.0, pools=(1,)))
    heads = ("linear", "logistic", "svm", "knn", "rbf")
    run = fit_heads([path], HeadsConfig(heads=heads, out_dir=tmp_path / "r"))
    streamed = fit_heads([path], HeadsConfig(heads=("logistic",), features=("pool1",),
                                             memory_limit_mb=0.001, out_dir=tmp_path / "s"))
    for result in run.results + streamed.results:
        grid = result["selection"]["grid"]
        assert {g["score"] for g in grid} == {1.0}, result["head"]  # a tie everywhere
        assert result["selection"]["chosen"] == grid[0]["params"], result["head"]
        first = {k: (list(v[0]) if isinstance(v[0], tuple) else v[0])
                 for k, v in get_head(result["head"]).grid.items()}
        assert result["selection"]["chosen"] == first, result["head"]
    assert streamed.results[0]["head"] == "sgd"


def test_without_val_the_streamed_head_is_refitted_on_all_of_train(tmp_path):
    """alpha is chosen on a holdout fold of train, then the model is trained again on every
    train row: SGD's update count t_ is 1 + epochs x train rows."""
    path = write_cache(tmp_path / "noval.h5", blob_splits(d=16, val=False, pools=(2,)))
    out = tmp_path / "r"
    ok(run_cli(path, "--features", "pool2", "--heads", "logistic", "--memory-limit-mb", "0.02",
               "--cv", "4", "--jobs", "1", "--out", out))
    result_path = out / "noval" / "heads" / "pool2__sgd.json"
    selection = read_result(result_path)["selection"]
    assert selection["on"] == "holdout" and selection["refit"] == "train"
    model = load_head(result_path)
    n_train = len(Cache(path).labels("train"))
    assert model.named_steps["head"].t_ == 1 + STREAM_EPOCHS * n_train
    assert model.named_steps["scaler"].n_samples_seen_ == n_train


def test_cv_selection_refits_on_all_of_train(tmp_path):
    path = write_cache(tmp_path / "noval.h5", blob_splits(d=16, val=False, pools=()))
    run = fit_heads([path], HeadsConfig(heads=("logistic",), cv=3, out_dir=tmp_path / "r"))
    assert run.results[0]["selection"]["on"] == "cv"
    model = load_head(run.json_paths[0])
    assert model.named_steps["scaler"].n_samples_seen_ == len(Cache(path).labels("train"))


@pytest.mark.parametrize("extra, mode", [((), "memory"), (("--pca", "4"), "pca"),
                                         (("--memory-limit-mb", "0.02"), "stream")])
def test_no_standardize_leaves_features_unscaled_in_every_mode(tmp_path, extra, mode):
    path = write_cache(tmp_path / "b.h5", blob_splits(d=16, pools=(2,)))
    out = tmp_path / "r"
    if mode == "pca":
        extra = extra + ("--memory-limit-mb", "0.02")
    ok(run_cli(path, "--features", "pool2", "--heads", "logistic", "--no-standardize",
               "--jobs", "1", "--out", out, *extra))
    (result_path,) = out.rglob("*.json")
    result = read_result(result_path)
    assert result["settings"]["memory"]["mode"] == mode
    assert result["settings"]["standardize"] is False
    model = load_head(result_path)
    assert model.named_steps["prescale" if mode == "pca" else "scaler"] == "passthrough"
    if mode == "pca":
        assert model.named_steps["scaler"] == "passthrough"  # nor on the reduced rows


def test_printed_table_is_sorted_by_test_balanced_accuracy(tmp_path):
    path = write_cache(tmp_path / "noisy.h5", blob_splits(d=8, sep=1.0, pools=(1,)))
    res = ok(run_cli(path, "--heads", "linear,knn,rbf", "--features", "all", "--jobs", "1",
                     "--out", tmp_path / "r"))
    csv = pd.read_csv(tmp_path / "r" / "heads_summary.csv")
    lines = res.stdout.splitlines()[1:1 + len(csv)]
    printed = [(line.split()[2], line.split()[3], float(line.split()[5])) for line in lines]
    assert len({b for _, _, b in printed}) >= 3  # the order is not decided by ties
    assert [b for _, _, b in printed] == sorted((b for _, _, b in printed), reverse=True)
    by_run = {(r.feature, r.head): round(r.test_balanced_accuracy, 3)
              for r in csv.itertuples()}
    assert {(f, h): b for f, h, b in printed} == by_run
