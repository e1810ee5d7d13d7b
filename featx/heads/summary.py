"""Text tables of heads runs for the terminal, and the pool-size figure of a heads run."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from featx.features import PENULTIMATE, pool_of
from featx.results import METRIC_COLUMNS

__all__ = ["format_pool_matrix", "format_summary", "plot_pool_summary"]


def _fmt(v, fmt=".3f") -> str:
    if v is None or v == "" or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(float(v), fmt)


def format_summary(rows: Sequence[dict]) -> str:
    """The runs as a text table, best test balanced accuracy first."""
    rows = sorted(rows, key=lambda r: -(r["test_balanced_accuracy"] or 0.0))
    # the sort key's column first, then the others in their table order
    columns = sorted(METRIC_COLUMNS, key=lambda c: c.key != "balanced_accuracy")
    widths = [max(6, len(c.short)) for c in columns]
    header = (f"{'dataset':<14} {'model':<14} {'feature':<11} {'head':<8} {'mode':<7} "
              + "".join(f"{c.short:>{w}} " for c, w in zip(columns, widths))
              + f"{'val':>6} {'fit_s':>7}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['dataset'][:14]:<14} {r['model'][:14]:<14} {r['feature']:<11} "
                     f"{r['head']:<8} {r['mode']:<7} "
                     + "".join(f"{_fmt(r.get(c.name), c.short_fmt):>{w}} "
                               for c, w in zip(columns, widths))
                     + f"{_fmt(r['val_score']):>6} {_fmt(r['select_s'] + r['fit_s'], '.2f'):>7}")
    lines.append("val: balanced accuracy of the chosen setting on val (or CV on train); "
                 "fit_s: selection + refit")
    return "\n".join(lines)


def _feature_order(name: str) -> tuple[int, int]:
    return (0, 0) if name == PENULTIMATE else (1, pool_of(name) or 0)


def format_pool_matrix(rows: Sequence[dict], *, title: str = "") -> str:
    """Feature (pool size) x head matrix of test balanced accuracy, val accuracy beside it
    (CV balanced accuracy when there is no val split)."""
    heads = list(dict.fromkeys(r["head"] for r in rows))
    features = sorted({r["feature"] for r in rows}, key=_feature_order)
    cell = {(r["feature"], r["head"]): r for r in rows}
    has_val = any(r.get("val_accuracy") is not None for r in rows)
    lines = [f"{title}: test balanced accuracy ({'val accuracy' if has_val else 'CV bal. acc'})"]
    lines.append(f"{'feature':<12}" + "".join(f"{h:>16}" for h in heads))
    for feat in features:
        cells = []
        for h in heads:
            r = cell.get((feat, h))
            if r is None:
                cells.append(f"{'-':>16}")
                continue
            side = r.get("val_accuracy") if has_val else r.get("val_score")
            cells.append(f"{_fmt(r['test_balanced_accuracy'])} ({_fmt(side)})".rjust(16))
        lines.append(f"{feat:<12}" + "".join(cells))
    return "\n".join(lines)


def plot_pool_summary(rows: Sequence[dict], path: Path, *, title: str) -> Path:
    """Test balanced accuracy per head against the feature (pool size) of ``rows``, as PNG."""
    from featx.plots import plot_pool_sizes
    scores: dict[str, dict[str, float]] = {}
    for r in rows:
        scores.setdefault(r["head"], {})[r["feature"]] = r["test_balanced_accuracy"]
    return plot_pool_sizes(scores, path, title=title, ylabel="test balanced accuracy")
