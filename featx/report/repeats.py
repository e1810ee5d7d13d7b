"""Repeats in the report: mean ± sd over splits or seeds, and a paired test against the best.

Two results are *repeats* of one experiment when they score the same files (the dataset's
``files_fingerprint``, whatever the split) with the same settings (``repeat.experiment``,
the hash of every setting but the split and the seed: :func:`featx.results.repeat_record`).
One repeat is one (split, seed): ``dataset.split_fingerprint`` and ``repeat.seed``. A *repeat
group* is every experiment on one dataset's files; within it:

- **mean ± sd** of the test balanced accuracy over each experiment's repeats (sd with
  ``ddof=1``). The sd is the spread over training and split variability: other train/val
  images, other test images, other seeds. It is not the uncertainty of one test score
  (test-sampling error; that is the bootstrap interval of a single result).
- **best**: the highest mean (ties: the most repeats, then the name).
- **paired test** of each other experiment against the best over the repeats both have
  (the same splits and seeds): a two-sided paired t-test of the per-repeat differences
  (:func:`scipy.stats.ttest_rel`). Why not Wilcoxon's signed-rank test: with K repeats its
  smallest two-sided p is ``2 / 2**K``, 0.0625 at K = 5, so with fewer than 6 repeats it can
  never reach 0.05, and K = 3..5 is the usual budget. The t-test assumes roughly normal
  differences; with K < 6 that cannot be checked, so read p as a guide, not a verdict.
  Differences that are all 0 give p = 1.
- **Holm** correction over the tests of a group (step-down: the i-th smallest of m p values
  times ``m - i + 1``, made monotone, capped at 1). ``≈ best``: Holm p ≥ 0.05, i.e. not
  shown to differ from the best.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

__all__ = ["REPEATS_RULE", "REPEAT_COLUMNS", "annotate_repeats", "holm", "repeats_markdown",
           "summarise_repeats"]

METRIC = "test_balanced_accuracy"
ALPHA = 0.05
REPEAT_COLUMNS = ["split_seed", "seed", "repeat_group", "repeats_n", "repeats_mean",
                  "repeats_sd", "repeats_delta", "repeats_p", "repeats_p_holm", "repeats_mark"]
REPEATS_RULE = (
    "results of the same settings on the same files over other splits or seeds are repeats; "
    "mean ± sd (ddof 1) of test balanced accuracy over them is training and split "
    "variability, not the test-sampling uncertainty of one score. Each setting is compared "
    "with the best mean by a paired t-test over the repeats both have (Wilcoxon's "
    "signed-rank test cannot reach p < 0.05 with fewer than 6), Holm-corrected within the "
    "group; '≈ best' = Holm p ≥ 0.05.")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the order given (``nan`` stays ``nan``)."""
    valid = [(p, i) for i, p in enumerate(pvalues) if p is not None and not math.isnan(p)]
    m = len(valid)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def _experiment_of(row: dict) -> tuple | None:
    """``(group key, experiment key, repeat id)`` of a ranked row, or None without one."""
    res = row.get("result") or {}
    rep, ds = res.get("repeat"), res.get("dataset") or {}
    if not isinstance(rep, dict) or not rep.get("experiment") or not ds.get("files_fingerprint"):
        return None
    if row.get(METRIC) is None:
        return None
    group = (row["dataset"], ds["files_fingerprint"])
    experiment = (row["kind"], row["model"], res.get("method", row["method"]),
                  rep["experiment"])
    return group, experiment, (ds["split_fingerprint"], rep.get("seed"))


def _paired_p(a: list[float], b: list[float]) -> float:
    from scipy import stats
    diffs = [x - y for x, y in zip(a, b)]
    if len(diffs) < 2:
        return math.nan
    if all(abs(d) < 1e-12 for d in diffs):
        return 1.0  # identical on every repeat: no difference to test
    return float(stats.ttest_rel(a, b).pvalue)


def summarise_repeats(ranked: Sequence[dict]) -> list[dict]:
    """One record per experiment with 2+ repeats (or one compared with such a best).

    Returns
    -------
    list of dict, by group then by mean (best first): ``group`` (dataset name),
    ``files_fingerprint``, ``kind``, ``model``, ``method``, ``experiment``, ``n`` (repeats),
    ``mean``, ``sd`` (None for one repeat), ``values`` (``{repeat id: score}``), ``delta``
    (mean paired difference to the best, None for the best), ``n_paired``, ``p`` (paired
    t-test), ``p_holm`` and ``mark`` (``best``, ``≈ best`` or ``""``).
    """
    values: dict = defaultdict(lambda: defaultdict(dict))
    for r in ranked:
        key = _experiment_of(r)
        if key is not None:
            group, experiment, rid = key
            values[group][experiment][rid] = r[METRIC]
    out = []
    for group in sorted(values):
        exps = values[group]
        if max(len(v) for v in exps.values()) < 2:
            continue  # no repeats in this group: nothing to summarise
        records = []
        for (kind, model, method, exp), vals in exps.items():
            xs = list(vals.values())
            mean = sum(xs) / len(xs)
            sd = (math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
                  if len(xs) > 1 else None)
            records.append({"group": group[0], "files_fingerprint": group[1], "kind": kind,
                            "model": model, "method": method, "experiment": exp,
                            "n": len(xs), "mean": mean, "sd": sd, "values": dict(vals),
                            "delta": None, "n_paired": None, "p": None, "p_holm": None,
                            "mark": ""})
        records.sort(key=lambda r: (-r["mean"], -r["n"], r["model"], r["method"]))
        best = records[0]
        best["mark"] = "best"
        tests = []
        for r in records[1:]:
            common = sorted(set(r["values"]) & set(best["values"]), key=str)
            a = [r["values"][k] for k in common]
            b = [best["values"][k] for k in common]
            r["n_paired"] = len(common)
            if common:
                r["delta"] = sum(x - y for x, y in zip(a, b)) / len(common)
            r["p"] = _paired_p(a, b)
            tests.append(r)
        for r, p in zip(tests, holm([r["p"] for r in tests])):
            r["p_holm"] = None if math.isnan(p) else p
            r["p"] = None if r["p"] is None or math.isnan(r["p"]) else r["p"]
            if r["p_holm"] is not None and r["p_holm"] >= ALPHA:
                r["mark"] = "≈ best"
        out += records
    return out


def annotate_repeats(ranked: list[dict]) -> list[dict]:
    """Add :data:`REPEAT_COLUMNS` to the rows of ``ranked`` (in place) and return the
    summaries (:func:`summarise_repeats`). A row on another split of a repeat group is
    marked as a repeat rather than only as 'test set differs'."""
    summaries = summarise_repeats(ranked)
    by_key = {(s["group"], s["files_fingerprint"], s["kind"], s["model"], s["method"],
               s["experiment"]): s for s in summaries}
    for r in ranked:
        rep = (r.get("result") or {}).get("repeat") or {}
        r["split_seed"], r["seed"] = rep.get("split_seed"), rep.get("seed")
        key = _experiment_of(r)
        if key is None:
            continue
        (name, files), (kind, model, method, exp), _ = key
        s = by_key.get((name, files, kind, model, method, exp))
        if s is None:
            continue
        r.update(repeat_group=f"{name} [files {files[:8]}]", repeats_n=s["n"],
                 repeats_mean=s["mean"], repeats_sd=s["sd"], repeats_delta=s["delta"],
                 repeats_p=s["p"], repeats_p_holm=s["p_holm"], repeats_mark=s["mark"])
        if not r.get("comparable") and r.get("reason") == "test set differs":
            r["reason"] = (f"test set differs: another repeat (split seed {r['split_seed']}, "
                           f"seed {r['seed']})")
    return summaries


def _f(v, fmt=".4f") -> str:
    return "–" if v is None else format(v, fmt)


def repeats_markdown(summaries: Sequence[dict]) -> list[str]:
    """The report.md section of the repeats, one table per group (empty: no repeats)."""
    if not summaries:
        return []
    lines = ["## Repeats over splits and seeds", "",
             "Test balanced accuracy over the repeats of each setting (same files, other "
             "splits or seeds). sd = training and split variability, not the uncertainty of "
             "one test score. Δ and p: paired over the repeats shared with the best (paired "
             "t-test, Holm-corrected within the group).", ""]
    groups: dict = defaultdict(list)
    for s in summaries:
        groups[(s["group"], s["files_fingerprint"])].append(s)
    for (name, files), members in groups.items():
        lines += [f"### {name} (files {files[:8]})", "",
                  "| model | method | kind | repeats | mean ± sd | Δ vs best | p | p (Holm) | |",
                  "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for s in members:
            sd = "" if s["sd"] is None else f" ± {s['sd']:.4f}"
            delta = "–" if s["delta"] is None else f"{s['delta']:+.4f}"
            pair = f" ({s['n_paired']} paired)" if s["n_paired"] not in (None, s["n"]) else ""
            mark = f"**{s['mark']}**" if s["mark"] else ""
            lines.append(f"| {s['model']} | {s['method'].replace('|', chr(92) + '|')} | "
                         f"{s['kind']} | {s['n']} | {s['mean']:.4f}{sd} | {delta}{pair} | "
                         f"{_f(s['p'], '.3g')} | {_f(s['p_holm'], '.3g')} | {mark} |")
        lines.append("")
    return lines
