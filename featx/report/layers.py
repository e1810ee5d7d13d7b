"""The layer-wise view of a report: a head's test metric against the depth of the layer its
features came from, one line per head and model, and the best layer per head.

Depth is the order of the cache's ``layers`` (recorded in every head result's provenance,
in forward order), then the last map (``penultimate``, ``pool{n}``) as the deepest point. A
layer with several features (``layer3.pool1``, ``layer3.pool2``, a ViT block's ``cls``)
shows the head's best of them, and the text names which. Fine-tuning results and heads on
caches without layers are left out (the pool-size plot covers those).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from featx.features import LAST4, layer_of
from featx.files import atomic_write

__all__ = ["LAST_MAP", "best_layers", "layer_lines", "layer_markdown", "plot_layer_scores"]

LAST_MAP = "last map"
METRIC = "test_balanced_accuracy"


def _layer(feature: str) -> str:
    if feature == LAST4:
        return LAST4
    layer, _ = layer_of(feature)
    return layer or LAST_MAP


def layer_lines(members: Sequence[dict], metric: str = METRIC) -> dict[str, dict]:
    """``{"head / model": {"depth": [layer, ...], "points": {layer: (value, feature)},
    "intervals": {layer: (lo, hi)}}}`` for the head results of ``members`` (report rows)
    whose cache recorded layers; ``intervals`` holds the chosen feature's 95% bootstrap
    interval where the row has one (``featx.report.paired`` fills ``{metric}_lo/_hi``).

    ``depth`` is that cache's layers in forward order, then ``last4`` when read, then the last
    map; each point is the head's best ``metric`` over the features of that layer.
    """
    lines: dict[str, dict] = {}
    for r in members:
        res = r.get("result") or {}
        prov = res.get("provenance") or {}
        layers = list(prov.get("layers") or [])
        feature, value = r.get("feature"), r.get(metric)
        if r.get("kind") != "head" or not layers or not isinstance(feature, str) \
                or value is None:
            continue
        depth = [name for name in layers if name != LAST4] + \
            ([LAST4] if LAST4 in layers else []) + [LAST_MAP]
        key = f"{res.get('head') or r.get('method')} / {r['model']}"
        line = lines.setdefault(key, {"depth": depth, "points": {}, "intervals": {}})
        layer = _layer(feature)
        if layer not in line["depth"]:
            continue
        best = line["points"].get(layer)
        if best is None or value > best[0]:
            line["points"][layer] = (float(value), feature)
            lo, hi = r.get(f"{metric}_lo"), r.get(f"{metric}_hi")
            if lo is not None and hi is not None:
                line["intervals"][layer] = (float(lo), float(hi))
            else:
                line["intervals"].pop(layer, None)
    return {k: v for k, v in lines.items() if v["points"]}


def best_layers(lines: dict[str, dict]) -> dict[str, tuple[str, str, float]]:
    """``{line: (layer, feature, value)}``: each head's best layer (the shallower on a tie)."""
    out = {}
    for key, line in lines.items():
        ranked = sorted(line["points"].items(),
                        key=lambda kv: (-kv[1][0], line["depth"].index(kv[0])))
        layer, (value, feature) = ranked[0]
        out[key] = (layer, feature, value)
    return out


def layer_markdown(members: Sequence[dict]) -> list[str]:
    """The report's lines naming the best layer per head (none without layer results)."""
    best = best_layers(layer_lines(members))
    if not best:
        return []
    lines = ["Best layer per head (test balanced accuracy; a layer's best feature):", ""]
    lines += [f"- {key}: **{layer}** (`{feature}`, {value:.4f})"
              for key, (layer, feature, value) in best.items()]
    return lines + [""]


def plot_layer_scores(members: Sequence[dict], path: str | Path, *,
                      title: str = "") -> Path | None:
    """A PNG of each head's best metric per layer against depth; ``None`` when no head
    result has layers."""
    lines = layer_lines(members)
    if not lines:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    depth = max((line["depth"] for line in lines.values()), key=len)
    fig = Figure(figsize=(max(6.4, 0.55 * len(depth) + 2), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    best = best_layers(lines)
    for key, line in lines.items():
        pts = [(line["depth"].index(layer), v) for layer, (v, _) in line["points"].items()]
        pts.sort()
        (drawn,) = ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", label=key)
        bars = [(line["depth"].index(layer), lo, hi)
                for layer, (lo, hi) in line["intervals"].items()]
        if bars:  # each layer's 95% interval, as a vertical bar in the line's colour
            ax.vlines([x for x, _, _ in bars], [lo for _, lo, _ in bars],
                      [hi for _, _, hi in bars], color=drawn.get_color(), alpha=0.45, lw=3)
        layer, _, value = best[key]
        ax.plot([line["depth"].index(layer)], [value], marker="*", markersize=13,
                color=drawn.get_color())
    ax.set_xticks(range(len(depth)), depth, rotation=45, ha="right", fontsize="small")
    ax.set_xlabel("layer (forward order); * = the head's best layer; bars: 95% intervals")
    ax.set_ylabel("test balanced accuracy (best feature of the layer)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
