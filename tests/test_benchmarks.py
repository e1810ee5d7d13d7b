"""The benchmark scripts compute their ratios and verdicts right, checked on numbers.

No timing is asserted: a test machine's speed says nothing about featx. What is checked is
arithmetic: every printed ratio agrees with the two figures beside it, every "met" with its
target, the best-of-repeats rule, and the peer script's feature alignment and agreement.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from benchmarks import peer_thingsvision as peer
from benchmarks import run as bench


def _interval(cell: str) -> tuple[float, float]:
    """The values a printed number such as ``12.3`` or ``4.5e-03`` can stand for."""
    m = re.fullmatch(r"(-?\d+)(?:\.(\d+))?(e[-+]\d+)?", cell.strip())
    assert m, cell
    v = float(cell)
    half = 0.5 * 10.0 ** (-len(m.group(2) or "")) * (10.0 ** int(m.group(3)[1:])
                                                     if m.group(3) else 1.0)
    return v - half, v + half


def check_row(row: dict) -> bool:
    """Assert that a row's ratio fits its two figures and its verdict fits its target.
    Returns whether the row carried a numeric ratio."""
    ratio = row["ratio"]
    if not ratio.endswith("x") or not re.fullmatch(r"[\d.]+", row["featx"]) \
            or not re.fullmatch(r"[\d.]+", row["reference"]):
        return False
    r = float(ratio[:-1])
    assert math.isfinite(r) and r > 0, row
    (f_lo, f_hi), (ref_lo, ref_hi) = _interval(row["featx"]), _interval(row["reference"])
    slack = 0.005 + 1e-9  # the ratio itself is printed with two decimals
    fits = [(max(f_lo, 1e-12) / ref_hi, f_hi / max(ref_lo, 1e-12)),
            (max(ref_lo, 1e-12) / f_hi, ref_hi / max(f_lo, 1e-12))]
    assert any(lo - slack <= r <= hi + slack for lo, hi in fits), row
    m = re.fullmatch(r"(<=|>=) ([\d.]+)x", row["target"])
    if m:
        bound = float(m.group(2))
        ok = r <= bound if m.group(1) == "<=" else r >= bound
        if abs(r - bound) > slack:  # at the bound the rounding may go either way
            assert row["met"] == ("yes" if ok else "no"), row
    return True


def test_quick_pools_run_prints_rows_whose_ratios_match_their_numbers(tmp_path, capsys):
    from tests.builders import write_digits
    data = write_digits(tmp_path / "digits", per_class=8, size=28, layout="split")
    out = tmp_path / "bench.md"
    assert bench.main(["--quick", "--only", "pools,layers", "--images", "12", "--data",
                       str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = bench.parse_table(printed.split("## all rows", 1)[1])
    assert [r["measured"].split(" (")[0] for r in rows] == [
        "pool 1,2,4,8 in one pass vs pool 1 alone",
        "same four pools from four separate passes",
        "4 stages x pool 1,2,4 in one pass vs the last layer alone"]
    assert sum(check_row(r) for r in rows) == 3
    # the file holds the same table, and says on which machine
    text = out.read_text()
    assert bench.parse_table(text) == rows and "machine:" in text


def test_ratio_check_catches_a_wrong_ratio_or_verdict():
    good = {"featx": "10.0", "reference": "4.0", "ratio": "2.50x", "target": ">= 2x",
            "met": "yes"}
    assert check_row(good)
    with pytest.raises(AssertionError):
        check_row({**good, "ratio": "3.10x"})
    with pytest.raises(AssertionError):
        check_row({**good, "met": "no"})


def test_noop_row_takes_the_best_of_each_side_and_judges_against_1_5x():
    row = bench.noop_row("extract", [9.0, 6.0, 7.5], [5.0, 4.0, 4.5], [5.1, 4.9], [4.2, 4.0])
    assert (row.featx, row.reference, row.ratio, row.met) == ("6.00", "4.00", "1.50x", "yes")
    assert "1.23x" in row.note  # CPU: 4.9 / 4.0
    slow = bench.noop_row("compare", [12.0, 16.0], [4.0, 5.0])
    assert (slow.ratio, slow.met) == ("3.00x", "no")
    assert check_row(vars(slow)) and check_row(vars(row))


def test_only_rejects_unknown_names(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", "--only", "nope"])
    assert exc.value.code != 0 and "choose from" in capsys.readouterr().err


def test_peer_alignment_agreement_and_rate_ratio_on_synthetic_numbers():
    rng = np.random.default_rng(0)
    keys = [f"train/C{i % 2}/{i}.png" for i in range(20)]
    X = rng.normal(size=(20, 8)).astype(np.float32)
    perm = rng.permutation(20)
    other = X[perm] + np.float32(1e-3)
    a, b = peer.align(keys, X, [keys[i] for i in perm], other)
    ag = peer.agreement(a, b)
    assert ag["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert ag["rel"] == pytest.approx(1e-3 * np.sqrt(X.size) / np.linalg.norm(other), rel=1e-3)
    # unaligned rows would differ by far more than the offset
    assert peer.agreement(X, other)["max_abs"] > 0.1
    with pytest.raises(ValueError, match="different images"):
        peer.align(keys, X, keys[:-1] + ["test/C0/x.png"], other)
    fx, ref, ratio = peer.rate_ratio(100, [4.0, 2.0], [5.0, 8.0])
    assert (fx, ref, ratio) == (50.0, 20.0, 2.5)


def test_quick_stats_run_prints_a_row_whose_ratio_matches_its_numbers(tmp_path, capsys):
    from tests.builders import write_digits
    data = write_digits(tmp_path / "digits", per_class=4, size=28, layout="split")  # unused
    assert bench.main(["--quick", "--only", "stats", "--data", str(data),
                       "--out", str(tmp_path / "b.md")]) == 0
    rows = bench.parse_table(capsys.readouterr().out.split("## all rows", 1)[1])
    assert len(rows) == 1 and rows[0]["measured"].startswith("report intervals + paired tests")
    assert check_row(rows[0])
