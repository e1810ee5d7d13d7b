"""Which exceptions the user sees as one line (FeatxError and its kin) and which keep their
traceback because they are featx's bugs."""
from click.testing import CliRunner

from featx.cli import main
from featx.errors import FeatxError, user_error_message


def test_every_error_of_the_users_is_a_featx_error_and_shows_its_first_line():
    from featx.apply import ResultMismatchError, UnsupportedHeadError
    from featx.backbones import UnknownModelError, WeightsError
    from featx.cache import CacheError, CacheLockedError, StaleCacheError
    from featx.data import DataError
    for cls in (UnknownModelError, WeightsError, CacheError, StaleCacheError, CacheLockedError,
                DataError, UnsupportedHeadError, ResultMismatchError):
        assert issubclass(cls, FeatxError), cls
        assert user_error_message(cls("what is wrong; what to do\ndetails")) == \
            "what is wrong; what to do"
    assert isinstance(FeatxError("x"), ValueError)  # callers catching ValueError keep working


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback():
    for exc in (ValueError("operands could not be broadcast"), KeyError("pool2"),
                TypeError("unsupported operand")):
        assert user_error_message(exc) is None


def test_cli_shows_a_featx_error_as_one_line_but_lets_a_bug_through(tmp_path, monkeypatch):
    import featx.heads.run as run

    def fail(exc):
        def raise_it(*a, **k):
            raise exc
        return raise_it

    cache = tmp_path / "c.h5"
    cache.write_bytes(b"")
    monkeypatch.setattr(run, "_check_config", fail(FeatxError("--cv 1: use 2 or more.")))
    result = CliRunner().invoke(main, ["fit-heads", str(cache)])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1] == "Error: --cv 1: use 2 or more."
    assert not isinstance(result.exception, FeatxError)  # click's exit, not the traceback

    monkeypatch.setattr(run, "_check_config", fail(ValueError("shapes (3,) and (4,)")))
    result = CliRunner().invoke(main, ["fit-heads", str(cache)])
    assert isinstance(result.exception, ValueError) and "Error:" not in result.output
