"""featx.config: the CLI's defaults are the configs'; --split-seed and --seed kept apart."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featx.cache import Cache
from featx.cli import main
from featx.config import (
    CompareConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadsConfig,
    check_setting,
    rule_of,
)
from featx.data import load_dataset
from tests.builders import write_digits

ROOT = Path(__file__).resolve().parents[1]
EXTRACT = ["extract", "--model", "mobilenet_v2", "--weights", "none", "--image-size", "32",
           "--precision", "fp32", "--workers", "0", "--no-progress"]


class _Captured(Exception):
    """Stops a command at its library call, carrying what the CLI passed."""


def _capture(monkeypatch, module, name):
    """Replace ``module.name`` by a stub that raises :class:`_Captured` with its arguments."""
    def stub(*args, **kwargs):
        raise _Captured(args, kwargs)
    monkeypatch.setattr(module, name, stub)


def _invoke_captured(*args, env=None):
    """The positional arguments of the stubbed library call that ``featx ARGS`` made."""
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    assert isinstance(result.exception, _Captured), result.output
    return result.exception.args[0]


def test_cli_defaults_are_the_config_defaults(digits_dir, monkeypatch):
    """Each command run with no options builds its library config with the config's defaults."""
    # conftest sets FEATX_ENGINE=torch for the suite's child processes; here the default counts
    monkeypatch.delenv("FEATX_ENGINE", raising=False)
    import featx.compare
    import featx.extract
    import featx.finetune
    import featx.heads
    _capture(monkeypatch, featx.extract, "extract")
    _capture(monkeypatch, featx.heads, "fit_heads")
    _capture(monkeypatch, featx.finetune, "check_config")
    _capture(monkeypatch, featx.compare, "run_compare")
    data = ["--data", digits_dir]

    _, cfg = _invoke_captured("extract", "--model", "resnet18", *data)
    # the command stores penultimate only unless --pool asks; the library's default is (1,)
    assert cfg == dataclasses.replace(ExtractConfig("resnet18"), pools=())
    _, cfg = _invoke_captured("fit-heads", "x.h5")
    # the command fits on every core unless --jobs says otherwise
    assert cfg == dataclasses.replace(HeadsConfig(), jobs=os.cpu_count() or 1)
    cfg, = _invoke_captured("finetune", "--model", "resnet18", *data)
    assert cfg == FinetuneConfig("resnet18")
    _, cfg = _invoke_captured("compare", "--models", "resnet18", *data)
    assert cfg == CompareConfig(("resnet18",))


def test_split_seed_makes_the_split_and_seed_the_rest(digits_dir, monkeypatch):
    """finetune and compare split with --split-seed (or FEATX_SPLIT_SEED) and seed the rest
    with --seed."""
    import featx.compare
    import featx.finetune
    _capture(monkeypatch, featx.finetune, "finetune")
    _capture(monkeypatch, featx.compare, "run_compare")
    expect = load_dataset(digits_dir, seed=3).splits
    assert expect != load_dataset(digits_dir, seed=0).splits
    ft = ["finetune", "--model", "resnet18", "--data", digits_dir, "--workers", "0",
          "--weights", "none"]
    data, cfg = _invoke_captured(*ft, "--split-seed", "3", "--seed", "5")
    assert data.splits == expect and cfg.seed == 5
    data, cfg = _invoke_captured("compare", "--models", "resnet18", "--data", digits_dir,
                                "--seed", "5", env={"FEATX_SPLIT_SEED": "3"})
    assert data.splits == expect and data.seed == 3 and cfg.seed == 5


@pytest.fixture
def tiny_digits(tmp_path) -> Path:
    """3 classes x 10 digit images as class folders: enough for splits that differ."""
    return write_digits(tmp_path / "digits", per_class=10)


def _extract(*args):
    result = CliRunner().invoke(main, [str(a) for a in [*EXTRACT, *args]])
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip().splitlines()[-1]), result.output


def test_two_split_seeds_write_two_reusable_caches(tiny_digits, tmp_path, monkeypatch):
    out = ["--data", tiny_digits, "--out", tmp_path / "cache"]
    first, _ = _extract(*out)
    second, _ = _extract(*out, "--split-seed", "3")
    assert first.name == "digits_mobilenet_v2_none_32.h5"  # seed 0: the name as before
    assert second.name == "digits_mobilenet_v2_none_32_split3.h5"
    a, b = Cache(first), Cache(second)
    assert a.attrs["split_seed"] == 0 and b.attrs["split_seed"] == 3
    assert sorted(a.paths("test")) != sorted(b.paths("test"))
    assert sorted(a.paths("test") + a.paths("train") + a.paths("val")) == \
        sorted(b.paths("test") + b.paths("train") + b.paths("val"))
    for path, extra in ((first, []), (second, ["--split-seed", "3"])):
        again, log = _extract(*out, *extra)
        assert again == path and "up to date, nothing to do" in log
    # finetune --split-from takes the cache's split, whatever --split-seed says
    import featx.finetune
    _capture(monkeypatch, featx.finetune, "finetune")
    data, _ = _invoke_captured("finetune", "--model", "mobilenet_v2", "--split-from", second,
                                "--weights", "none", "--workers", "0")
    assert data.splits == {s: b.split_items(s) for s in b.splits}


def test_seed_changes_the_random_init_but_not_the_split(tiny_digits, tmp_path):
    data = ["--data", tiny_digits]
    base, _ = _extract(*data, "--out", tmp_path / "a")
    other, _ = _extract(*data, "--out", tmp_path / "b", "--seed", "1")
    assert other.name == base.name
    a, b = Cache(base), Cache(other)
    for split in ("train", "val", "test"):
        assert a.paths(split) == b.paths(split)
    assert a.attrs["split_seed"] == b.attrs["split_seed"] == 0
    assert a.attrs["weights_sha256"] != b.attrs["weights_sha256"]
    assert not np.array_equal(a.load("test", "penultimate"), b.load("test", "penultimate"))


def test_pre_split_data_ignores_split_seed_in_the_name(tmp_path):
    root = write_digits(tmp_path / "digits_split", layout="split", per_class=10)
    path, _ = _extract("--data", root, "--out", tmp_path, "--split-seed", "7")
    assert path.name == "digits_split_mobilenet_v2_none_32.h5"
    assert Cache(path).attrs["split_seed"] is None


@pytest.mark.parametrize("command", [["extract", "--model", "resnet18"],
                                     ["finetune", "--model", "resnet18"],
                                     ["compare", "--models", "resnet18"]])
def test_split_seed_out_of_range_is_one_line(digits_dir, command):
    result = CliRunner().invoke(main, [*command, "--data", str(digits_dir), "--split-seed", "-1"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert len(errors) == 1 and "'--split-seed'" in errors[0], result.output


def test_fit_heads_help_lists_every_registered_head():
    from featx.heads import list_heads
    text = CliRunner().invoke(main, ["fit-heads", "--help"]).output
    for name in list_heads():
        assert name in text.split("--features")[0], name


def test_help_imports_neither_torch_nor_sklearn():
    script = ("import sys, json\nfrom featx.cli import main\n"
              "for args in (['--help'], ['compare', '--help'], ['fit-heads', '--help']):\n"
              "    try:\n        main(args, standalone_mode=False)\n"
              "    except SystemExit:\n        pass\n"
              "print(json.dumps(sorted(m for m in ('torch', 'sklearn') if m in sys.modules)))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


def _library_checks():
    """Each config class -> the library call that refuses a bad setting of it up front."""
    from featx.compare import run_compare
    from featx.extract.single import _check_settings
    from featx.finetune import check_config
    from featx.heads.run import _check_config
    return {ExtractConfig: _check_settings, FinetuneConfig: check_config,
            HeadsConfig: lambda cfg: _check_config(["c.h5"], cfg),
            CompareConfig: lambda cfg: run_compare(None, cfg)}  # checks before reading data


_COMMANDS = {ExtractConfig: "extract", FinetuneConfig: "finetune", HeadsConfig: "fit-heads",
             CompareConfig: "compare"}
_REQUIRED = {ExtractConfig: ("resnet18",), FinetuneConfig: ("resnet18",), HeadsConfig: (),
             CompareConfig: (("resnet18",),)}


def _bad_and_good(rule: dict) -> tuple[list, list]:
    """Values ``rule`` refuses and values it takes, the bounds themselves included."""
    if "choices" in rule:
        return ["nope"], [c for c in rule["choices"] if c != "none"]
    low, high, step = rule["min"], rule["max"], 1 if rule["integer"] else 0.5
    bad, good = [], []
    if low is not None:
        bad.append(low if rule["min_open"] else low - step)
        good.append(low + step if rule["min_open"] else low)
    if high is not None:
        bad.append(high + step)
        good.append(high)
    return bad, good


def _declared_rules():
    return [(cls, f.name) for cls in _COMMANDS for f in dataclasses.fields(cls)
            if rule_of(cls, f.name)]


@pytest.mark.parametrize("cls, name", _declared_rules(),
                         ids=lambda v: v if isinstance(v, str) else v.__name__)
def test_a_rule_declared_on_a_field_is_both_the_cli_type_and_the_library_check(cls, name):
    """The one declaration in featx.config refuses (and takes) the same values in the
    command's click option and in the library's check of the config."""
    import click

    from featx.errors import ParameterError
    command = main.commands[_COMMANDS[cls]]
    options = [p for p in command.params if getattr(p, "field", None) == name]
    assert len(options) == 1, f"featx {command.name} has no option for {cls.__name__}.{name}"
    option, rule = options[0], rule_of(cls, name)
    bad, good = _bad_and_good(rule)
    check = _library_checks()[cls]
    default = cls(*_REQUIRED[cls])
    for value in bad:
        with pytest.raises(click.BadParameter):
            option.type.convert(str(value), option, None)
        with pytest.raises(ParameterError) as err:
            check(dataclasses.replace(default, **{name: value}))
        assert (err.value.param, err.value.value) == (name, value)
        assert str(err.value) == f"{name}={err.value.shown}{err.value.sep}{rule['problem']}"
    for value in good:
        assert option.type.convert(str(value), option, None) == value
        check_setting(cls, name, value)


def test_a_declared_rule_shows_in_help_and_refuses_on_the_command_line():
    from featx.errors import ParameterError
    from featx.finetune import check_config
    text = CliRunner().invoke(main, ["finetune", "--help"]).output
    assert "--epochs INTEGER RANGE" in text and "x>=1" in text.split("--epochs")[1]
    assert "[sgd|adam|adamw]" in text.split("--optimizer")[1].split("\n")[0]
    r = CliRunner().invoke(main, ["finetune", "--model", "resnet18", "--epochs", "0"])
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output
    with pytest.raises(ParameterError, match=r"^epochs=0: must be at least 1\.$"):
        check_config(FinetuneConfig("resnet18", epochs=0))
