"""Is a row really worse than the best of its group? Intervals and paired tests for a report.

Within one group of :func:`~featx.report.ranking.rank_results` (one dataset and split, so
one set of test images), :func:`analyse_group` reads every row's per-image test outputs
(:func:`featx.results.read_image_outputs`), draws **one** stratified bootstrap of the test
images (:func:`featx.stats.draw_resamples`) and scores every row on those very resamples, so
that:

- every row's metrics get their 95% percentile interval (the ``test_{metric}_lo``/``_hi``
  cells of :data:`~featx.results.METRIC_COLUMNS`);
- every row is compared with the group's best row on the same images: the paired-bootstrap
  interval of the difference in the ranking metric (``delta``, ``delta_lo``, ``delta_hi``,
  its two-sided ``p``), McNemar's exact test on accuracy (``mcnemar_p``) and, for two
  classes, DeLong's test on ROC-AUC (``delong_p``); each family Holm-corrected across the
  rows of the group (``*_holm``). ``approx_best``: the row is not shown to differ from the
  best (Holm-adjusted ``p`` >= 0.05), which is not the same as "equal";
- the verdict sentence opens the report: the best fine-tuning against the best frozen head.

What these numbers mean and do not mean: docs/statistics.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from featx.artifacts import artifact_file
from featx.errors import FeatxError
from featx.results import METRIC_COLUMNS, read_image_outputs
from featx.stats import (
    bootstrap_distribution,
    bootstrap_p,
    delong_test,
    draw_resamples,
    holm,
    mcnemar_exact,
    percentile_interval,
)

__all__ = ["ALPHA", "APPROX_BEST", "PAIRED_COLUMNS", "RANKING_METRIC", "GroupStats",
           "analyse_group", "load_outputs"]

RANKING_METRIC = "balanced_accuracy"
ALPHA = 0.05
APPROX_BEST = "≈ best"
BOOTSTRAP_SEED = 0  # one seed for every report: the same results give the same intervals

# report.csv's paired columns (after the metric columns), in order
PAIRED_COLUMNS = ("delta", "delta_lo", "delta_hi", "p", "p_holm", "approx_best",
                  "mcnemar_p", "mcnemar_p_holm", "delong_p", "delong_p_holm")


@dataclass
class GroupStats:
    """What :func:`analyse_group` found: the verdict sentence (or None), the rows it had no
    outputs for, problems with outputs files (``(source, reason)``), and per row (by index
    in the group) its outputs, for the reliability diagrams."""

    verdict: str | None = None
    missing: list[dict] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    outputs: dict[int, dict] = field(default_factory=dict)
    best: dict | None = None


def load_outputs(row: dict) -> dict | None:
    """The per-image outputs of a report row (None when its result names none); raises
    :class:`~featx.errors.FeatxError` for a file that is not the one its result recorded."""
    artifacts = row["result"].get("artifacts")
    if not isinstance(artifacts, dict) or "test_outputs" not in artifacts:
        return None
    try:
        path = artifact_file(row["path"], row["result"], "test_outputs")
    except FileNotFoundError as exc:
        raise FeatxError(str(exc).splitlines()[0]) from None
    return read_image_outputs(path, row["result"])


def _aligned(ref: dict, out: dict) -> dict | None:
    """``out`` in the image order of ``ref`` (both keyed by path); None when the two were not
    scored on the same images with the same labels."""
    if out["paths"] == ref["paths"]:
        aligned = out
    else:
        where = {p: i for i, p in enumerate(out["paths"])}
        if len(where) != len(out["paths"]) or set(where) != set(ref["paths"]):
            return None
        order = np.array([where[p] for p in ref["paths"]])
        aligned = {"paths": ref["paths"], "y_true": out["y_true"][order],
                   "y_pred": out["y_pred"][order], "scores": out["scores"][order]}
    return aligned if np.array_equal(aligned["y_true"], ref["y_true"]) else None


def _is_probability(row: dict) -> bool:
    return (row["result"].get("metrics") or {}).get("score_kind") == "probability"


def analyse_group(members: Sequence[dict], *, n_boot: int, seed: int = BOOTSTRAP_SEED
                  ) -> GroupStats:
    """Intervals and paired tests for the rows of one ranked group (updated in place).

    Parameters
    ----------
    members : sequence of dict
        One group's rows as :func:`~featx.report.ranking.rank_results` orders them (rank 1
        first).
    n_boot : int
        Bootstrap resamples (at least 1).
    seed : int
        Seed of the resamples, shared by every row of the group.

    Each row with outputs gets its ``test_{metric}_lo``/``_hi`` cells and the
    :data:`PAIRED_COLUMNS`; the reference is the best-ranked row with outputs.
    """
    stats = GroupStats()
    loaded: dict[int, dict] = {}
    for i, r in enumerate(members):
        try:
            out = load_outputs(r)
        except FeatxError as exc:
            stats.problems.append((r["source"], str(exc).splitlines()[0]))
            out = None
        if out is None:
            stats.missing.append(r)
        else:
            loaded[i] = out
    if not loaded:
        return stats
    ref_i = min(loaded)
    ref = loaded[ref_i]
    for i in list(loaded):
        aligned = _aligned(ref, loaded[i])
        if aligned is None:
            stats.problems.append((members[i]["source"], "its test outputs are not on the same "
                                   "images as the group's best; no paired tests for it"))
            del loaded[i]
        else:
            loaded[i] = aligned
    stats.outputs = loaded
    n_classes = ref["scores"].shape[1]
    y = ref["y_true"]
    res = draw_resamples(y, n_boot, seed=seed)
    dists = {}
    for i, out in loaded.items():
        r = members[i]
        dist = bootstrap_distribution(y, out["y_pred"], out["scores"], n_classes, res,
                                      probabilities=_is_probability(r))
        dists[i] = dist
        for c in METRIC_COLUMNS:
            if c.interval:
                iv = percentile_interval(dist[c.key]) if c.key in dist else None
                r[c.lo_name], r[c.hi_name] = iv if iv else (None, None)
    _paired(members, loaded, dists, ref_i, y, n_classes)
    stats.best = members[ref_i]
    stats.verdict = _verdict(members, loaded, dists, ref_i)
    return stats


def _paired(members, loaded, dists, ref_i, y, n_classes) -> None:
    """The paired columns of every row with outputs, against row ``ref_i``."""
    key = f"test_{RANKING_METRIC}"
    best, best_out = members[ref_i], loaded[ref_i]
    others = [i for i in loaded if i != ref_i]
    for i in others:
        r, out = members[i], loaded[i]
        delta = dists[i][RANKING_METRIC] - dists[ref_i][RANKING_METRIC]
        iv = percentile_interval(delta)
        r["delta"] = (r[key] - best[key]) if r[key] is not None and best[key] is not None \
            else None
        r["delta_lo"], r["delta_hi"] = iv if iv else (None, None)
        r["p"] = bootstrap_p(delta)
        r["mcnemar_p"] = mcnemar_exact(out["y_true"] == out["y_pred"],
                                       best_out["y_true"] == best_out["y_pred"])["p"]
        r["delong_p"] = (delong_test(y, out["scores"][:, 1], best_out["scores"][:, 1])["p"]
                         if n_classes == 2 and len(np.unique(y)) == 2 else None)
    for name in ("p", "mcnemar_p", "delong_p"):
        ps = [members[i][name] if members[i][name] is not None else math.nan for i in others]
        for i, q in zip(others, holm(ps) if ps else []):
            members[i][f"{name}_holm"] = None if math.isnan(q) else float(q)
    for i in others:
        q = members[i]["p_holm"]
        members[i]["approx_best"] = bool(q is not None and q >= ALPHA)
    best.update(delta=0.0, delta_lo=0.0, delta_hi=0.0, p=1.0, p_holm=1.0, approx_best=True,
                mcnemar_p=1.0, mcnemar_p_holm=1.0,
                delong_p=1.0 if n_classes == 2 else None,
                delong_p_holm=1.0 if n_classes == 2 else None)


def _points(v: float) -> str:
    return f"{100 * v:+.1f}".replace("-", "−")


def _name(r: dict) -> str:
    if r["kind"] == "finetune":
        detail = r["method"].removeprefix("finetune ").strip()
        return f"fine-tuning {r['model']}" + (f" ({detail})" if detail else "")
    return f"{r['method']} on {r['model']}"


def _verdict(members, loaded, dists, ref_i) -> str:
    """One sentence: the best fine-tuning against the best frozen head when the group has
    both (with outputs), else the best row and how many rows are ≈ best."""
    key = f"test_{RANKING_METRIC}"
    head = next((i for i in sorted(loaded) if members[i]["kind"] == "head"), None)
    ft = next((i for i in sorted(loaded) if members[i]["kind"] == "finetune"), None)
    if head is not None and ft is not None and members[head][key] is not None \
            and members[ft][key] is not None:
        h, f = members[head], members[ft]
        delta = dists[ft][RANKING_METRIC] - dists[head][RANKING_METRIC]
        iv = percentile_interval(delta) or (math.nan, math.nan)
        p = bootstrap_p(delta)
        d = f[key] - h[key]
        if p < ALPHA:
            judged = "better" if d > 0 else "worse"
        else:
            judged = "not shown to be better" if d >= 0 else "not shown to be worse"
        cost = ""
        if f.get("wall_s") and h.get("wall_s"):
            ratio = f["wall_s"] / h["wall_s"]
            cost = f", at {ratio:.2g}× the cost" if ratio < 10 else f", at {ratio:.0f}× the cost"
        p_text = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
        return (f"{_name(f)} vs the best frozen head ({h['method']} on {h['model']}): "
                f"Δ balanced accuracy {_points(d)} points [{_points(iv[0])}, {_points(iv[1])}], "
                f"{p_text} — {judged}{cost}.")
    best = members[ref_i]
    lo, hi = best.get(f"{key}_lo"), best.get(f"{key}_hi")
    near = sum(1 for i in loaded if members[i].get("approx_best"))
    interval = f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else ""
    value = f"{best[key]:.3f}" if best[key] is not None else "–"
    return (f"best: {_name(best)}, balanced accuracy {value}{interval}; {near} of "
            f"{len(loaded)} rows ≈ best (not shown to differ from it, Holm-corrected).")
