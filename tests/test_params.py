"""Library messages name the library's parameters; the CLI shows the flags that set them."""
import ast
import pickle
import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from featx.cli import _FLAGS, main
from featx.config import FinetuneConfig
from featx.errors import (
    PARAMETERS,
    FeatxError,
    Note,
    ParameterError,
    name_parameters,
    user_error_message,
)
from featx.finetune import check_config


def _bad_batch_size() -> ParameterError:
    with pytest.raises(ParameterError) as err:
        check_config(FinetuneConfig(model="resnet18", batch_size=0))
    return err.value


def test_a_library_check_names_the_parameter_not_a_flag():
    exc = _bad_batch_size()
    assert (exc.param, exc.value) == ("batch_size", 0)
    assert str(exc) == "batch_size=0: must be at least 1."
    assert user_error_message(exc) == "batch_size=0: must be at least 1."
    with pytest.raises(ParameterError, match=r"^optimizer='lbfgs': use one of sgd, adam"):
        check_config(FinetuneConfig(model="resnet18", optimizer="lbfgs"))
    # a ParameterError crossing a process boundary (joblib, multiprocessing) keeps its text
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)


def test_the_cli_shows_the_flag_for_a_library_check(monkeypatch, tmp_path):
    import featx.heads.run as run
    monkeypatch.setattr(run, "_check_config", lambda *a, **k: check_config(
        FinetuneConfig(model="resnet18", batch_size=0)))
    cache = tmp_path / "c.h5"
    cache.write_bytes(b"")
    result = CliRunner().invoke(main, ["fit-heads", str(cache)])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == "Error: --batch-size 0: must be at least 1."
    assert user_error_message(_bad_batch_size(), _FLAGS) == "--batch-size 0: must be at least 1."


def test_flags_that_differ_from_the_parameter_name_are_mapped(digits_dir, tmp_path):
    args = ["extract", "--model", "resnet18", "--weights", "none", "--no-progress",
            "--data", str(digits_dir), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args + ["--split", "0.9,0.2,0.1"])
    assert result.output.splitlines()[-1] == (
        "Error: --split '0.9,0.2,0.1' must be three fractions train,val,test that sum to 1 "
        "with train > 0, e.g. 0.7,0.15,0.15")
    result = CliRunner().invoke(main, args + ["--device", "tpu"])
    assert result.output.splitlines()[-1] == "Error: --device 'tpu': use auto, cpu or cuda."
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_placeholders_name_other_parameters_and_leave_other_braces():
    text = "drop {early_stop} or use {split_fractions} in /data/{train}/pool{n} or {"
    assert name_parameters(text) == \
        "drop early_stop or use split_fractions in /data/{train}/pool{n} or {"
    assert name_parameters(text, _FLAGS) == \
        "drop --early-stop or use --split in /data/{train}/pool{n} or {"
    # any FeatxError may name parameters in its advice, not only a ParameterError
    advice = FeatxError("3 images are gone; pass {allow_missing} to go on without them.")
    assert str(advice) == "3 images are gone; pass allow_missing to go on without them."
    assert user_error_message(advice, _FLAGS) == \
        "3 images are gone; pass --allow-missing to go on without them."
    exc = ParameterError("early_stop", 3, "needs a val split; drop {early_stop}.", sep=" ")
    assert str(exc) == "early_stop=3 needs a val split; drop early_stop."
    assert exc.render(_FLAGS) == "--early-stop 3 needs a val split; drop --early-stop."
    flag_only = ParameterError("resume", True, "last.pt is damaged; run without {resume}.",
                               shown="")
    assert str(flag_only) == "resume: last.pt is damaged; run without resume."
    assert flag_only.render(_FLAGS) == "--resume: last.pt is damaged; run without --resume."
    note = Note("note: {workers} 9 is more than the cores here.")
    assert note == "note: workers 9 is more than the cores here."
    assert note.render(_FLAGS) == "note: --workers 9 is more than the cores here."
    with pytest.raises(ValueError, match="not in featx.errors.PARAMETERS"):
        ParameterError("batchsize", 0, "must be at least 1.")


def _cli_flags() -> set[str]:
    """Every flag of every featx command (and subcommand)."""
    flags, todo = set(), [main]
    while todo:
        cmd = todo.pop()
        todo += list(getattr(cmd, "commands", {}).values())
        flags |= {o for p in cmd.params if isinstance(p, click.Option)
                  for o in p.opts + p.secondary_opts}
    return flags


def _named_in_source() -> set[str]:
    """Parameter names the library gives ParameterError (and its kin) as literal strings,
    the defaults of its ``param`` arguments (cap_workers, check_seed) and the config fields
    that declare a rule (featx.config.check_settings names them)."""
    import dataclasses

    import featx.config as config
    named = {f.name for cls in (config.ExtractConfig, config.FinetuneConfig, config.HeadsConfig,
                                config.CompareConfig)
             for f in dataclasses.fields(cls) if config.rule_of(cls, f.name)}
    for path in (Path(__file__).parents[1] / "featx").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args:
                f = node.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")
                if (name.endswith("ParameterError") or name == "_WeightsValueError") and \
                        isinstance(node.args[0], ast.Constant):
                    named.add(node.args[0].value)
            if isinstance(node, ast.FunctionDef):  # cap_workers(n, param="workers")
                args = node.args.args[-len(node.args.defaults):] if node.args.defaults else []
                named |= {d.value for a, d in zip(args, node.args.defaults) if a.arg == "param"}
    return named


def test_every_parameter_a_message_can_name_is_a_flag_of_some_command():
    flags = _cli_flags()
    missing = {p: _FLAGS[p] for p in PARAMETERS if _FLAGS[p] not in flags}
    assert not missing, f"no featx command has these flags any more: {missing}"
    named = _named_in_source()
    assert {"batch_size", "split_fractions", "data_path", "weights", "image_size"} <= named
    assert named <= PARAMETERS, named - PARAMETERS
    # and each entry is still named somewhere, as a subject or a {{name}} in an f-string
    placeholders = {m for path in (Path(__file__).parents[1] / "featx").rglob("*.py")
                    for m in re.findall(r"\{\{(\w+)\}\}", path.read_text())}
    assert PARAMETERS <= named | placeholders, PARAMETERS - named - placeholders


def test_head_settings_name_parameters_in_the_library_and_flags_in_the_cli(tmp_path):
    from featx.config import HeadsConfig
    from featx.heads.run import _check_config
    for kwargs, library in [
            (dict(cv=1), "cv=1: need at least 2 folds."),
            (dict(jobs=0), "jobs=0: must be at least 1."),
            (dict(select="test"), "select='test': use val or cv."),
            (dict(class_weight="inverse"), "class_weight='inverse': use none or balanced."),
            (dict(scheduler="tcp://h:8786"), "scheduler=tcp://h:8786: loky runs on this machine "
             "only; add backend dask or backend ray to use a cluster.")]:
        with pytest.raises(ParameterError) as err:
            _check_config(["c.h5"], HeadsConfig(**kwargs))
        assert str(err.value) == library
    cache = tmp_path / "c.h5"
    cache.write_bytes(b"")
    result = CliRunner().invoke(main, ["fit-heads", str(cache), "--scheduler", "tcp://h:8786"])
    assert result.output.splitlines()[-1] == (
        "Error: --scheduler tcp://h:8786: loky runs on this machine only; add --backend dask or "
        "--backend ray to use a cluster.")
