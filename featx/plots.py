"""Figures written as PNG files, one function per plot.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so
it works on machines without a display and inside worker processes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from featx.features import pool_of
from featx.files import atomic_write

__all__ = ["plot_confusion_matrix", "plot_forest", "plot_pool_sizes", "plot_reliability",
           "plot_score_vs_time", "plot_training_curves"]


def _save(fig, path: Path) -> Path:
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_training_curves(history: Sequence[Mapping], path: str | Path, *,
                         title: str = "") -> Path:
    """Loss and accuracy per epoch, train and val, side by side.

    Parameters
    ----------
    history : sequence of mappings
        One per epoch with ``epoch``, ``train_loss``, ``train_acc`` and optionally
        ``val_loss``, ``val_acc`` (``None`` when there is no val split).
    path : str or Path
        PNG file to write (folders are created; written atomically).

    Returns
    -------
    Path of the PNG.
    """
    fig = _figure(9.0, 3.6)
    axes = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split in ("train", "val"):
            pts = [(e, row.get(f"{split}_{key}")) for e, row in zip(epochs, history)]
            pts = [(e, v) for e, v in pts if v is not None]
            if pts:
                ax.plot([e for e, _ in pts], [v for _, v in pts], marker="o", markersize=3,
                        label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_pool_sizes(scores: Mapping[str, Mapping[str, float]], path: str | Path, *,
                    title: str = "", ylabel: str = "test balanced accuracy") -> Path:
    """A metric against pool size, one line per method.

    Parameters
    ----------
    scores : mapping
        ``{method: {feature: value}}`` with features ``pool{n}`` (the x axis, log2 scale) and
        optionally ``penultimate`` (drawn as a dotted horizontal line in the method's colour).
        ``None`` values are left out.
    path : str or Path
        PNG file to write (folders are created; written atomically).

    Returns
    -------
    Path of the PNG.
    """
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    sizes: set[int] = set()
    for method, by_feature in scores.items():
        pts = sorted((n, v) for f, v in by_feature.items()
                     if (n := pool_of(f)) is not None and v is not None)
        if not pts:
            continue
        sizes.update(n for n, _ in pts)
        (line,) = ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=method)
        pen = by_feature.get("penultimate")
        if pen is not None:
            ax.axhline(pen, color=line.get_color(), linestyle=":", linewidth=1)
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(sizes), [str(n) for n in sorted(sizes)])
    ax.set_xlabel("pool size n (AdaptiveAvgPool2d(n)); dotted: penultimate")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                          path: str | Path, *, title: str = "") -> Path:
    """A confusion matrix: counts in the cells, colour = share of the true class (recall).

    Parameters
    ----------
    matrix : array-like of shape (n_classes, n_classes)
        Counts, rows = true class, columns = predicted class, in ``classes`` order.
    classes : sequence of str
        Class names.
    path : str or Path
        PNG file to write (folders are created; written atomically).

    Returns
    -------
    Path of the PNG.
    """
    import numpy as np
    counts = np.asarray(matrix, dtype=float)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"confusion matrix of shape {counts.shape} does not match "
                         f"{k} classes ({', '.join(map(str, classes))})")
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = min(3.6 + 0.45 * k, 12.0)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if k <= 20:  # beyond that the numbers no longer fit in the cells
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center",
                        fontsize="small", color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(k), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:  # method names are long; wrap to the figure's width
        import textwrap
        width = int(side * 9)
        ax.set_title("\n".join(textwrap.fill(line, width) for line in title.splitlines()),
                     fontsize="medium")
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_score_vs_time(points: Sequence[Mapping], path: str | Path, *, title: str = "",
                       xlabel: str = "wall time (s, log scale)",
                       ylabel: str = "test balanced accuracy") -> Path:
    """A score against wall time (log x), one colour per group of points.

    Parameters
    ----------
    points : sequence of mappings
        Each with ``x`` (seconds, > 0; others are left out), ``y``, ``group`` (the legend
        entry and colour, e.g. "frozen heads") and optionally ``label`` (written beside the
        point; give it to the few points worth naming).
    path : str or Path
        PNG file to write (folders are created; written atomically).

    Returns
    -------
    Path of the PNG.
    """
    fig = _figure(7.0, 4.6)
    ax = fig.add_subplot()
    groups: dict[str, list[Mapping]] = {}
    for p in points:
        if p.get("x") is not None and p["x"] > 0 and p.get("y") is not None:
            groups.setdefault(str(p.get("group", "")), []).append(p)
    xs = [p["x"] for pts in groups.values() for p in pts]
    mid = math.sqrt(min(xs) * max(xs)) if xs else 1.0
    for name, pts in groups.items():
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], s=28, alpha=0.8,
                   label=f"{name} ({len(pts)})")
        for p in pts:
            if p.get("label"):  # right of the point in the left half, left of it otherwise
                right = p["x"] <= mid
                ax.annotate(str(p["label"]), (p["x"], p["y"]), textcoords="offset points",
                            xytext=(5 if right else -5, 4), ha="left" if right else "right",
                            fontsize="x-small")
    if groups:
        ax.set_xscale("log")
        ax.margins(x=0.08, y=0.08)
        ax.legend(loc="best", fontsize="small")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_forest(rows: Sequence[Mapping], path: str | Path, *, title: str = "",
                xlabel: str = "test balanced accuracy") -> Path:
    """Each method's metric with its 95% interval, one line per method, best at the top.

    Parameters
    ----------
    rows : sequence of mappings
        In rank order, with ``label``, ``value``, ``lo``, ``hi`` (None: point only),
        ``group`` (the family: its colour and legend entry) and ``mark`` (e.g. "≈ best",
        written at the right).
    path : str or Path
        PNG file to write.
    """
    fig = _figure(8.0, 1.2 + 0.32 * max(len(rows), 1))
    ax = fig.subplots()
    groups = list(dict.fromkeys(r["group"] for r in rows))
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    labelled = set()
    for y, r in enumerate(reversed(list(rows))):
        if r["value"] is None:
            continue
        colour = colours[r["group"]]
        if r["lo"] is not None and r["hi"] is not None:
            ax.plot([r["lo"], r["hi"]], [y, y], color=colour, linewidth=2)
        ax.plot([r["value"]], [y], "o", color=colour,
                label=None if r["group"] in labelled else r["group"])
        labelled.add(r["group"])
        if r.get("mark"):
            ax.annotate(r["mark"], (1.0, y), xycoords=("axes fraction", "data"),
                        xytext=(4, 0), textcoords="offset points", va="center",
                        fontsize="small")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r["label"] for r in reversed(list(rows))], fontsize="small")
    ax.set_xlabel(f"{xlabel} (dot) and 95% interval (line)")
    ax.grid(True, axis="x", alpha=0.3)
    if labelled:
        ax.legend(loc="lower right", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_reliability(bins: Mapping, path: str | Path, *, title: str = "") -> Path:
    """A reliability diagram: per confidence bin, the accuracy against the mean top-class
    confidence (bars), the diagonal of perfect calibration, and how many images each bin
    holds (below).

    ``bins`` : from :func:`featx.stats.reliability_bins` (``edges``, ``count``,
    ``confidence``, ``accuracy``).
    """
    fig = _figure(5.0, 5.4)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    edges, count = bins["edges"], bins["count"]
    width = edges[1] - edges[0]
    filled = count > 0
    ax.bar(edges[:-1][filled], bins["accuracy"][filled], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot(bins["confidence"][filled], bins["accuracy"][filled], "o", color="C3",
            markersize=3, label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    ax_n.bar(edges[:-1], count, width=width, align="edge", color="C0", edgecolor="black")
    ax_n.set_xlim(0, 1)
    ax_n.set_xlabel("top-class confidence")
    ax_n.set_ylabel("images")
    if title:
        ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    return _save(fig, Path(path))
