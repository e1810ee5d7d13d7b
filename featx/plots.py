"""Figures written as PNG files, one function per plot.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so
it works on machines without a display and inside worker processes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["plot_pool_sizes", "plot_training_curves"]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
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


def _pool_size(feature: str) -> int | None:
    return int(feature[4:]) if feature.startswith("pool") and feature[4:].isdigit() else None


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
                     if (n := _pool_size(f)) is not None and v is not None)
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
