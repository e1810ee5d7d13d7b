"""featx.artifacts: model files that cannot run code when read, found only in the result's own
folder, refused when their sha256 is not the recorded one (the attacks of issue #24)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from featx.artifacts import (
    TRUSTED_HEAD_TYPES,
    ArtifactError,
    dump_head_model,
    file_sha256,
    load_head_model,
)
from featx.cli import main
from featx.heads import build_head, list_heads, load_head
from tests.builders import assert_one_line_error, malicious_pickle


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def heads_copy(head_experiment, tmp_path):
    """The session's head results copied to ``tmp_path/heads``, free to tamper with."""
    src = head_experiment.results[("penultimate", "logistic")].parent
    dst = tmp_path / "heads"
    shutil.copytree(src, dst)
    return dst


def _predict(head_experiment, result, tmp_path):
    return run("predict", "--head", result, "--data", head_experiment.data, "--out",
               tmp_path / "p.csv", "--no-progress")


def _export(result, tmp_path):
    return run("export", result, "--out", tmp_path / "m.pt2")


def _set_artifacts(result, **changes):
    record = json.loads(result.read_text())
    record["artifacts"].update(changes)
    result.write_text(json.dumps(record))


def test_every_head_featx_fits_round_trips_through_the_trusted_types(tmp_path):
    """Each registered head (scaled or not, binary and multiclass, float32 rows wide enough
    for a ball tree) loads back with TRUSTED_HEAD_TYPES alone and predicts the same."""
    rng = np.random.default_rng(0)
    for X, y in ((rng.normal(size=(60, 8)), np.arange(60) % 3),
                 (rng.normal(size=(40, 40)).astype(np.float32), np.arange(40) % 2)):
        for name in list_heads():
            for standardize in (True, False):
                pipe = build_head(name, standardize=standardize).fit(X, y)
                path = tmp_path / f"{name}.skops"
                dump_head_model(pipe, path)
                back = load_head_model(path)
                np.testing.assert_array_equal(back.predict(X), pipe.predict(X))
    assert len(TRUSTED_HEAD_TYPES) == len(set(TRUSTED_HEAD_TYPES))


def test_pickle_payload_as_head_model_never_runs(head_experiment, heads_copy, tmp_path):
    """The attack of #24: the head's model file replaced by a pickle that creates a file.
    Refused with one line and the file never appears: with the JSON as written (its sha256
    differs), with the JSON's sha256 edited to match (not a skops file), as an old
    ``.joblib`` result, and through load_head on the file itself."""
    marker = tmp_path / "pwned"
    result = heads_copy / "penultimate__logistic.json"
    model = result.with_suffix(".skops")
    model.write_bytes(malicious_pickle(marker))
    for r in (_predict(head_experiment, result, tmp_path), _export(result, tmp_path)):
        assert_one_line_error(r, "sha256", "replaced")
    _set_artifacts(result, model_sha256=file_sha256(model))
    for r in (_predict(head_experiment, result, tmp_path), _export(result, tmp_path)):
        assert_one_line_error(r, str(model), "not a skops file")
    with pytest.raises(ArtifactError, match="not a skops file"):
        load_head(model)
    with pytest.raises(ArtifactError, match="not a skops file"):
        load_head(result)
    # a result of an older featx: a .joblib beside it, never unpickled
    old = model.with_suffix(".joblib")
    old.write_bytes(malicious_pickle(marker))
    _set_artifacts(result, model=old.name, model_sha256=file_sha256(old))
    for r in (_predict(head_experiment, result, tmp_path), _export(result, tmp_path)):
        assert_one_line_error(r, old.name, "re-run fit-heads")
    with pytest.raises(ArtifactError, match="re-run fit-heads"):
        load_head(old)
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.pt2").exists()


def test_skops_file_holding_other_types_is_refused_unloaded(tmp_path):
    """A skops file (valid zip) whose objects are not among the types featx writes, e.g. a
    FunctionTransformer calling os.system, is refused before anything is built."""
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer
    path = tmp_path / "evil.skops"
    sio.dump(Pipeline([("x", FunctionTransformer(os.system))]), path)
    with pytest.raises(ArtifactError, match="holds types featx does not write"):
        load_head_model(path)


def test_swapped_head_model_is_refused_by_its_sha256(head_experiment, heads_copy, tmp_path):
    """Another genuine featx head (the knn one) in place of the logistic one: a valid skops
    file of trusted types, refused by predict and export because its sha256 differs."""
    result = heads_copy / "penultimate__logistic.json"
    shutil.copy(heads_copy / "penultimate__knn.skops", result.with_suffix(".skops"))
    assert_one_line_error(_predict(head_experiment, result, tmp_path), "sha256", "replaced",
                        "penultimate__logistic.skops")
    assert_one_line_error(_export(result, tmp_path), "sha256", "replaced")
    with pytest.raises(ArtifactError, match="sha256"):
        load_head(result)
    # a result that records no sha256 (an older featx) is refused too
    record = json.loads(result.read_text())
    del record["artifacts"]["model_sha256"]
    result.write_text(json.dumps(record))
    assert_one_line_error(_predict(head_experiment, result, tmp_path), "records no sha256")


def test_artifact_names_outside_the_results_folder_are_refused(head_experiment, heads_copy,
                                                               tmp_path):
    """``../x``, an absolute path and a symlink out of the folder: refused with one line even
    when the file there is a genuine head with its sha256 recorded."""
    result = heads_copy / "penultimate__logistic.json"
    genuine = result.with_suffix(".skops")
    sha = file_sha256(genuine)
    outside = tmp_path / "outside.skops"
    shutil.copy(genuine, outside)
    for name in ("../outside.skops", str(outside)):
        _set_artifacts(result, model=name, model_sha256=sha)
        for r in (_predict(head_experiment, result, tmp_path), _export(result, tmp_path)):
            assert_one_line_error(r, "not a file name in the result's own folder")
        with pytest.raises(ArtifactError, match="own folder"):
            load_head(result)
    link = heads_copy / "linked.skops"
    link.symlink_to(outside)
    _set_artifacts(result, model=link.name, model_sha256=sha)
    for r in (_predict(head_experiment, result, tmp_path), _export(result, tmp_path)):
        assert_one_line_error(r, "is a link")
    # the genuine name again: predict works, so the refusals above were about the names
    _set_artifacts(result, model=genuine.name, model_sha256=sha)
    r = _predict(head_experiment, result, tmp_path)
    assert r.exit_code == 0, r.output
