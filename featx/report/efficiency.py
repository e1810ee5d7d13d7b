"""Label efficiency in the report: the metric against labelled train images per class.

Results trained on a labelled subset of train (``train_subset``, from ``fit-heads`` or
``finetune --shots/--train-fraction``) are one curve per setting instead of rows of the
ranking: the x axis is the labelled images per class (``shots``; for a fraction, the subset's
train images divided by the classes, a mean since classes differ in size), log scale; the
line is the mean test balanced accuracy over the draws and the band its spread (mean ± sd
over the draws, ddof 1; a single draw has no band). The sd over draws is the variability of
*which* images were labelled, not the test-sampling uncertainty of one score. Heads and
fine-tuning share the plot, in their families' styles.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from featx.files import atomic_write

__all__ = ["EFFICIENCY_COLUMNS", "EFFICIENCY_RULE", "efficiency_markdown", "plot_label_efficiency",
           "split_subset_rows", "summarise_efficiency", "write_efficiency"]

METRIC = "test_balanced_accuracy"
EFFICIENCY_COLUMNS = ["shots", "train_fraction", "draw", "n_train", "per_class_labelled"]
EFFICIENCY_RULE = (
    "results trained on a labelled subset of train (--shots, --train-fraction) are drawn "
    "against labelled images per class (for a fraction: its train images / classes) instead "
    "of being ranked; line = mean over the draws, band = ± sd over the draws (which images "
    "were labelled), val and test untouched.")


def split_subset_rows(rows: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """``(rows on all of train, rows on a labelled subset)`` of :func:`load_results` rows;
    the second get :data:`EFFICIENCY_COLUMNS`."""
    full, subset = [], []
    for r in rows:
        sub = (r.get("result") or {}).get("train_subset")
        if not isinstance(sub, dict):
            full.append(r)
            continue
        n_classes = max(len(r.get("classes") or []), 1)
        n_train = sub.get("n_train")
        per_class = (sub["shots"] if sub.get("shots") is not None
                     else (n_train / n_classes if isinstance(n_train, (int, float)) else None))
        subset.append({**r, "shots": sub.get("shots"), "train_fraction": sub.get("fraction"),
                       "draw": sub.get("draw"), "n_train": n_train,
                       "per_class_labelled": per_class})
    return full, subset


def summarise_efficiency(rows: Sequence[dict]) -> list[dict]:
    """One point per (dataset, test set, kind, model, method, subset size): ``x`` (labelled
    images per class), ``mean``, ``sd`` (None for one draw), ``n_draws``, ``values``."""
    points: dict = defaultdict(list)
    for r in rows:
        if r.get(METRIC) is None or r.get("per_class_labelled") is None:
            continue
        size = ("shots", r["shots"]) if r["shots"] is not None else ("fraction",
                                                                    r["train_fraction"])
        key = (r["dataset"], r["test_fingerprint"], r["kind"], r["model"],
               (r.get("result") or {}).get("method", r["method"]), size)
        points[key].append((r["per_class_labelled"], r[METRIC]))
    out = []
    for (name, test, kind, model, method, size), vals in sorted(points.items(), key=str):
        xs, ys = [v[0] for v in vals], [v[1] for v in vals]
        mean = sum(ys) / len(ys)
        sd = math.sqrt(sum((y - mean) ** 2 for y in ys) / (len(ys) - 1)) if len(ys) > 1 else None
        out.append({"dataset": name, "test_fingerprint": test, "kind": kind, "model": model,
                    "method": method, "size": f"{size[0]} {size[1]:g}",
                    "x": sum(xs) / len(xs), "mean": mean, "sd": sd, "n_draws": len(ys),
                    "values": ys})
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_label_efficiency(points: Sequence[dict], path: str | Path, *, title: str = "",
                          ylabel: str = "test balanced accuracy") -> Path:
    """The metric against labelled images per class (log x), a line per (kind, model,
    method), a band of ± sd over the draws; frozen heads solid, fine-tuning dashed.

    Parameters
    ----------
    points : sequence of dict
        As :func:`summarise_efficiency` returns them.
    path : str or Path
        PNG to write (atomically; folders made).
    """
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    lines: dict = defaultdict(list)
    for p in points:
        lines[(p["kind"], p["model"], p["method"])].append(p)
    for (kind, model, method), pts in sorted(lines.items()):
        pts.sort(key=lambda p: p["x"])
        xs = [p["x"] for p in pts]
        ys = [p["mean"] for p in pts]
        style = "--" if kind == "finetune" else "-"
        (line,) = ax.plot(xs, ys, style, marker="o", markersize=4, label=f"{method} / {model}")
        lo = [p["mean"] - (p["sd"] or 0.0) for p in pts]
        hi = [p["mean"] + (p["sd"] or 0.0) for p in pts]
        ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xlabel("labelled train images per class (log)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(loc="lower right", fontsize="x-small")
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def write_efficiency(rows: Sequence[dict], out: Path, notes: list[str]) -> dict:
    """The label-efficiency plot per (dataset, test set) and ``label_efficiency.csv``.

    Returns ``{"points": [...], "plots": {title: path}, "csv": path or None}``.
    """
    points = summarise_efficiency(rows)
    if not points:
        return {"points": [], "plots": {}, "csv": None}
    by_set: dict = defaultdict(list)
    for p in points:
        by_set[(p["dataset"], p["test_fingerprint"])].append(p)
    plots = {}
    for (name, test), pts in by_set.items():
        suffix = "" if len(by_set) == 1 else f"_{name}_{test[:8]}"
        title = f"{name}: label efficiency (test set {test[:8]})"
        if len({p["size"] for p in pts}) < 2:
            notes.append(f"{name}: one labelled-subset size only; the label-efficiency plot "
                         f"has single points")
        plots[title] = plot_label_efficiency(pts, out / f"label_efficiency{suffix}.png",
                                             title=title)
    columns = ["dataset", "test_fingerprint", "kind", "model", "method", "size", "x", "mean",
               "sd", "n_draws"]
    path = out / "label_efficiency.csv"
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for p in points:
            w.writerow({k: ("" if p[k] is None else round(p[k], 6) if isinstance(p[k], float)
                            else p[k]) for k in columns})
    return {"points": points, "plots": plots, "csv": path}


def efficiency_markdown(written: dict, out: Path) -> list[str]:
    """The report.md section: the plot(s) and a table of mean ± sd per subset size."""
    if not written["points"]:
        return []
    import os
    lines = ["## Label efficiency", "",
             "Test balanced accuracy against labelled train images per class (mean ± sd over "
             "the draws; val and test untouched). Data: `label_efficiency.csv`.", ""]
    for title, p in written["plots"].items():
        lines += [f"![{title}]({os.path.relpath(p, out).replace(os.sep, '/')})", ""]
    lines += ["| model | method | kind | subset | per class | draws | mean ± sd |",
              "|---|---|---|---|---:|---:|---:|"]
    for p in written["points"]:
        sd = "" if p["sd"] is None else f" ± {p['sd']:.4f}"
        lines.append(f"| {p['model']} | {p['method']} | {p['kind']} | {p['size']} | "
                     f"{p['x']:g} | {p['n_draws']} | {p['mean']:.4f}{sd} |")
    lines.append("")
    return lines
