"""The report's tables as text: the aligned terminal table (:func:`format_table`), the
markdown table of a group (:func:`md_table`), and the cells both share: every metric with its
interval, the Holm p and the best / "≈ best" marks. Groups come in rank order
(:func:`groups`); :func:`group_title` says what makes a group comparable. report.md,
report.html and the terminal all take their cells from here."""
from __future__ import annotations

from typing import Sequence

from featx.report.paired import APPROX_BEST
from featx.results import METRIC_COLUMNS

__all__ = ["best_mark", "fmt_value", "format_table", "group_title", "md_table",
           "ranked_groups", "seconds"]


def fmt_value(value: float | None, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def seconds(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


_TABLE_HEAD = (["rank", "model", "method", "kind"] + [c.header for c in METRIC_COLUMNS]
               + ["p (Holm)", "wall s", "best"])
# right-aligned: rank, the metrics, p, wall s
_NUMERIC = {0, *range(4, 4 + len(METRIC_COLUMNS) + 2)}


def _metric_cell(r: dict, c) -> str:
    """``0.897 [0.873, 0.920]`` with an interval (3 decimals: the interval says the 4th means
    nothing), else the value in the column's format."""
    value = r.get(c.name)
    lo, hi = (r.get(c.lo_name), r.get(c.hi_name)) if c.interval else (None, None)
    if value is None or lo is None or hi is None:
        return fmt_value(value, c.fmt)
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def best_mark(r: dict) -> str:
    if r["best"]:
        return r["best"]
    return APPROX_BEST if r.get("approx_best") else ""


def _cells(r: dict) -> list[str]:
    return ([str(r["rank"]), r["model"], r["method"], r["kind"]]
            + [_metric_cell(r, c) for c in METRIC_COLUMNS]
            + [_p(r.get("p_holm")), seconds(r["wall_s"]), best_mark(r)])


def ranked_groups(ranked: Sequence[dict]) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in ranked:
        groups.setdefault(r["group"], []).append(r)
    return list(groups.values())


def group_title(members: list[dict]) -> str:
    r = members[0]
    parts = [f"split {r['split_fingerprint'][:8]}", f"test set {r['test_fingerprint'][:8]}"]
    if isinstance(r["n_test"], int):
        parts.append(f"{r['n_test']} test images")
    if r["classes"]:
        parts.append(f"{len(r['classes'])} classes: {', '.join(map(str, r['classes']))}")
    head = r["group"] if r["comparable"] else f"{r['group']}: NOT COMPARABLE, {r['reason']}"
    return f"{head} ({'; '.join(parts)})"


def format_table(ranked: Sequence[dict]) -> str:
    """Aligned text, one block per group, rows as ordered by :func:`rank_results`."""
    blocks = []
    for members in ranked_groups(ranked):
        lines = [_TABLE_HEAD] + [_cells(r) for r in members]
        widths = [max(len(line[i]) for line in lines) for i in range(len(_TABLE_HEAD))]
        text = ["  ".join(c.rjust(w) if i in _NUMERIC else c.ljust(w)
                          for i, (c, w) in enumerate(zip(line, widths))).rstrip()
                for line in lines]
        blocks.append("\n".join([group_title(members)] + text))
    return "\n\n".join(blocks)


def md_table(members: list[dict]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")
    lines = ["| " + " | ".join(_TABLE_HEAD) + " |",
             "|" + "|".join("---:" if i in _NUMERIC else "---"
                            for i in range(len(_TABLE_HEAD))) + "|"]
    for r in members:
        cells = [esc(c) for c in _cells(r)]
        if cells[-1]:
            cells[-1] = f"**{cells[-1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
