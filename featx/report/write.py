"""Tables and plots from result files: frozen heads and fine-tuning, ranked side by side.

:func:`~featx.report.ranking.load_results` reads every featx result JSON under a folder,
:func:`~featx.report.ranking.rank_results` groups them by dataset and split, works out each row's
wall time and ranks the rows within their group (the rules are in :mod:`featx.report.ranking`),
:func:`format_table` prints them, and :func:`write_report` writes ``report.md``,
``report.csv``, ``report.html`` (:mod:`featx.report.html`) and the PNG figures.
"""
from __future__ import annotations

import csv
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

from featx.artifacts import ArtifactError, artifact_file
from featx.config import ReportConfig, check_settings
from featx.errors import FeatxError
from featx.features import pool_of
from featx.files import atomic_write
from featx.report.ranking import (
    BEST_MARK,
    COMPARABLE_RULE,
    RANK_RULE,
    WALL_TIME_RULE,
    load_results,
    rank_results,
    run_folder,
)
from featx.report.paired import PAIRED_COLUMNS, GroupStats, analyse_group
from featx.report.efficiency import (
    EFFICIENCY_COLUMNS,
    EFFICIENCY_RULE,
    efficiency_markdown,
    split_subset_rows,
    write_efficiency,
)
from featx.report.repeats import REPEAT_COLUMNS, REPEATS_RULE, annotate_repeats, repeats_markdown
from featx.report.tables import (best_mark, fmt_value, format_table, group_title, md_table,
                                 ranked_groups)
from featx.results import METRIC_COLUMNS

__all__ = ["REPORT_COLUMNS", "format_table", "write_report"]

# every metric's value and interval bounds (Column.names), then the paired tests against the
# group's best (featx.report.paired)
REPORT_COLUMNS = (["group", "comparable", "reason", "dataset", "rank", "best", "model", "method",
                   "kind", "feature", "head"] + [n for c in METRIC_COLUMNS for n in c.names]
                  + list(PAIRED_COLUMNS)
                  + ["n_test", "wall_s", "extract_share_s", "run_s", "split_fingerprint",
                     "test_fingerprint", "source"] + REPEAT_COLUMNS + EFFICIENCY_COLUMNS)

_FAMILIES = {"head": "frozen heads", "finetune": "fine-tuning"}


# --- files -----------------------------------------------------------------------------------

def _write_atomic(path: Path, write: Callable) -> Path:
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        write(f)
    return path


def _write_csv(path: Path, ranked: Sequence[dict]) -> Path:
    def cell(v):
        if v is None:
            return ""
        return round(v, 6) if isinstance(v, float) else v

    def write(f):
        w = csv.DictWriter(f, fieldnames=REPORT_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in ranked:
            w.writerow({k: cell(r.get(k)) for k in REPORT_COLUMNS})
    return _write_atomic(path, write)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def _read_history(row: dict) -> tuple[list[dict] | None, str]:
    """The epochs of a fine-tuning run from the history CSV its result points at."""
    artifacts = row["result"].get("artifacts")
    artifacts = artifacts if isinstance(artifacts, dict) else {}
    keys = [k for k, v in artifacts.items()
            if "history" in str(k).lower() and isinstance(v, str) and v.endswith(".csv")]
    if not keys:
        return None, "its result names no history CSV"
    try:  # only a file in the result's own folder, as for its model
        path = artifact_file(row["path"], row["result"], keys[0], verify=False)
    except ArtifactError as exc:
        return None, str(exc)
    except FileNotFoundError:
        return None, f"history {row['path'].parent / artifacts[keys[0]]} cannot be read"
    try:
        with open(path, newline="") as f:
            raw = list(csv.DictReader(f))
    except OSError:
        return None, f"history {path} cannot be read"
    history = []
    for line in raw:
        rec: dict[str, Any] = {}
        for k, v in line.items():
            try:
                rec[k] = float(v) if v not in (None, "") else None
            except ValueError:
                rec[k] = v
        if rec.get("epoch") is None:
            return None, f"history {path} has no 'epoch' column"
        history.append(rec)
    if not history:
        return None, f"history {path} has no epochs"
    return history, ""


def _pool_scores(members: list[dict]) -> dict[str, dict[str, float]]:
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for r in members:
        feature = r["feature"]
        if not isinstance(feature, str) or r["test_balanced_accuracy"] is None:
            continue
        # one line per (head, model); the feature is the x axis, so take it out of the name
        name = r["method"].replace(f" @ {feature}", "")
        name = re.sub(r" pool=\d+", "", name)
        scores[f"{name} / {r['model']}"][feature] = r["test_balanced_accuracy"]
    return dict(scores)


def _stat_plots(members: list[dict], stats: GroupStats, out: Path, suffix: str,
                notes: list[str]) -> list[Path]:
    """The forest plot of the ranking metric and the reliability diagrams of the best head
    and the best fine-tuning (from their stored outputs, when they hold probabilities)."""
    from featx.plots import plot_forest, plot_reliability
    from featx.stats import reliability_bins
    name, written = members[0]["group"], []
    key = "test_balanced_accuracy"
    rows = [{"label": f"{r['model']} {r['method']}"[:60], "value": r[key],
             "lo": r.get(f"{key}_lo"), "hi": r.get(f"{key}_hi"),
             "group": _FAMILIES.get(r["kind"], r["kind"]), "mark": best_mark(r)}
            for r in members if r[key] is not None]
    if rows:
        written.append(plot_forest(rows, out / f"forest{suffix}.png",
                                   title=f"{name}: balanced accuracy, 95% intervals"))
    def probabilities(r):
        return (r["result"].get("metrics") or {}).get("score_kind") == "probability"

    for kind, mark in BEST_MARK.items():
        # the best row of the family whose scores are probabilities (a ridge or linear SVM
        # head has none to calibrate), said in the title when it is not the family's best
        ranked = [i for i, r in enumerate(members) if r["kind"] == kind and i in stats.outputs]
        i = next((i for i in ranked if probabilities(members[i])), None)
        if i is None:
            if ranked:
                notes.append(f"{name}: no {_FAMILIES.get(kind, kind)} result gives "
                             f"probabilities; no reliability diagram")
            continue
        r = members[i]
        if i != ranked[0]:
            mark = f"{mark} with probabilities"
        out_i = stats.outputs[i]
        ece = (r["result"].get("metrics") or {}).get("ece")
        written.append(plot_reliability(
            reliability_bins(out_i["y_true"], out_i["scores"]),
            out / f"reliability_{kind}{suffix}.png",
            title=f"{mark}: {r['model']} {r['method']}"
                  + (f"\nECE {ece:.3f}" if isinstance(ece, float) else "")))
    return written


def _plots_for_group(members: list[dict], out: Path, suffix: str,
                     notes: list[str]) -> list[Path]:
    from featx.plots import plot_confusion_matrix, plot_pool_sizes, plot_score_vs_time
    name = members[0]["group"]
    written = []
    scores = _pool_scores(members)
    if any(pool_of(f) is not None for s in scores.values() for f in s):
        written.append(plot_pool_sizes(scores, out / f"pool_size{suffix}.png",
                                       title=f"{name}: test balanced accuracy vs pool size"))
    else:
        notes.append(f"{name}: no pool{{n}} results, pool-size plot skipped")
    from featx.report.layers import plot_layer_scores  # heads on intermediate layers
    layers_png = plot_layer_scores(members, out / f"layers{suffix}.png",
                                   title=f"{name}: test balanced accuracy vs layer")
    written += [layers_png] if layers_png is not None else []

    order = list(_FAMILIES)  # the same colour for each family in every plot
    points = [{"x": r["wall_s"], "y": r["test_balanced_accuracy"],
               "group": _FAMILIES.get(r["kind"], r["kind"]),
               "label": f"{r['model']} {r['method']}" if r["best"] else ""}
              for r in sorted(members, key=lambda r: (order.index(r["kind"])
                                                      if r["kind"] in order else len(order)))]
    written.append(plot_score_vs_time(points, out / f"score_vs_time{suffix}.png",
                                      title=f"{name}: frozen heads vs fine-tuning"))

    for kind, mark in BEST_MARK.items():
        best = next((r for r in members if r["best"] == mark), None)
        if best is None:
            continue
        cm = best["result"]["metrics"].get("confusion_matrix")
        if not cm or len(cm) != len(best["classes"]):
            notes.append(f"{name}: {best['source']} has no usable confusion matrix, "
                         f"{mark} plot skipped")
            continue
        written.append(plot_confusion_matrix(
            cm, best["classes"], out / f"confusion_{mark.replace(' ', '_')}{suffix}.png",
            title=f"{mark}: {best['model']} {best['method']}\n"
                  f"balanced accuracy {fmt_value(best['test_balanced_accuracy'])}"))
    return written


def _curves(ranked: Sequence[dict], out: Path, notes: list[str]) -> list[Path]:
    from featx.plots import plot_training_curves
    written = []
    for r in ranked:
        if r["kind"] != "finetune":
            continue
        history, why = _read_history(r)
        if history is None:
            notes.append(f"{r['source']}: {why}; training curves skipped")
            continue
        name = _slug(run_folder(r["source"]))
        written.append(plot_training_curves(
            history, out / "curves" / f"{name}.png",
            title=f"{r['group']}: {r['model']} {r['method']}"))
    return written


def _markdown(results_dir: Path, ranked: list[dict], plots: dict[str, list[Path]],
              curves: list[Path], out: Path, problems: list[tuple[str, str]],
              notes: list[str], verdicts: list[str], sections: Sequence[str] = ()) -> str:
    from featx import __version__
    groups = ranked_groups(ranked)
    kinds = Counter(r["kind"] for r in ranked)
    lines = ["# featx report", "",
             f"{len(ranked)} result(s) under `{results_dir}`: "
             + ", ".join(f"{n} {_FAMILIES.get(k, k)}" for k, n in sorted(kinds.items()))
             + f"; {len({r['dataset'] for r in ranked})} dataset(s). "
             f"Written {time.strftime('%Y-%m-%d %H:%M')} by featx {__version__}.", ""]
    if verdicts:
        lines[1:1] = ["", *(f"**{v}**" for v in verdicts)]

    def rel(p: Path) -> str:
        return os.path.relpath(p, out).replace(os.sep, "/")

    for members in groups:
        if not members[0]["comparable"]:
            continue
        lines += [f"## {group_title(members)}", "", md_table(members), ""]
        lines += [f"![{p.stem}]({rel(p)})" for p in plots.get(members[0]["group"], [])]
        lines.append("")
        from featx.report.layers import layer_markdown
        lines += layer_markdown(members)
    others = [g for g in groups if not g[0]["comparable"]]
    if others:
        lines += ["## Not comparable", "",
                  "These results were scored on another split than the main group of their "
                  "dataset, so they are ranked only among themselves.", ""]
        for members in others:
            lines += [f"### {group_title(members)}", "", md_table(members), ""]
    lines += list(sections)  # repeats, label efficiency (featx.report.repeats / efficiency)
    if curves:
        lines += ["## Fine-tuning curves", ""]
        lines += [f"![{p.stem}]({rel(p)})" for p in curves]
        lines.append("")
    if problems:
        lines += [f"## Files that could not be read ({len(problems)})", ""]
        lines += [f"- `{path}`: {why}" for path, why in problems]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    lines += ["---", "", "How to read this report:", "",
              f"- **Ranking:** {RANK_RULE}",
              f"- **Wall time:** {WALL_TIME_RULE}",
              f"- **Comparability:** {COMPARABLE_RULE}",
              f"- **Repeats:** {REPEATS_RULE}",
              f"- **Label efficiency:** {EFFICIENCY_RULE}",
              "- Metrics are on the test split (ROC-AUC one-vs-rest macro for 3+ classes; "
              "– when undefined). Plots cover the main group of each dataset.",
              f"- **Intervals and tests:** {STATS_RULE}", ""]
    return "\n".join(lines)


STATS_RULE = (
    "[lo, hi] are 95% percentile intervals from a bootstrap of the test images stratified by "
    "class (the same resamples for every row of a group); they cover the variation of the "
    "test set, not of training. p (Holm): the paired-bootstrap test of the row's balanced "
    "accuracy against the group's best on the same images, Holm-corrected across the "
    "group's rows; '≈ best' = not shown to differ from the best at 0.05, which is not "
    "'equal'. report.csv adds McNemar's exact test (accuracy) and, for two classes, "
    "DeLong's test (ROC-AUC). See docs/statistics.md.")


def _statistics(ranked: list[dict], n_boot: int, notes: list[str],
                problems: list[tuple[str, str]]) -> tuple[dict[str, GroupStats], list[str]]:
    """Intervals and paired tests per group (rows updated in place); the verdicts of the
    comparable groups. Rows without stored outputs are named in one note."""
    stats, verdicts, missing = {}, [], []
    groups = ranked_groups(ranked)
    for members in groups:
        if n_boot <= 0:
            continue
        st = analyse_group(members, n_boot=n_boot)
        stats[members[0]["group"]] = st
        problems.extend(st.problems)
        missing.extend(st.missing)
        if st.verdict and members[0]["comparable"]:
            n_main = sum(1 for g in groups if g[0]["comparable"])
            verdicts.append(st.verdict if n_main == 1 else f"{members[0]['group']}: {st.verdict}")
    if missing:
        kinds = {r["kind"] for r in missing}
        fix = " or ".join(([f"`featx fit-heads CACHE --out ...` (heads)"] if "head" in kinds
                           else []) + (["`featx finetune ... --resume` (fine-tuning)"]
                                       if "finetune" in kinds else []))
        notes.append(f"{len(missing)} result(s) have no usable per-image test outputs "
                     f"(e.g. {missing[0]['source']}; written by an older featx): ranked, but "
                     f"without intervals or paired tests; re-run {fix} with the same settings "
                     f"to add them.")
    return stats, verdicts


def write_report(results_dir: str | Path, out: str | Path | None = None, *,
                 config: ReportConfig | None = None) -> dict[str, Any]:
    """Read the results under ``results_dir``; write ``report.md``, ``.csv``, ``.html`` and plots.

    Parameters
    ----------
    results_dir : str or Path
        Folder searched recursively for result JSON files (heads and fine-tuning).
    out : str or Path, optional
        Folder for the report; default ``results_dir/report``.

    Returns
    -------
    dict with ``table`` (the aligned text table), ``markdown``, ``csv`` and ``html`` (paths),
    ``plot`` (list of PNG paths), ``note`` (list of remarks: unreadable files, skipped
    plots, results without outputs) and ``verdict`` (the opening sentence(s), or None).

    ``config``: :class:`~featx.config.ReportConfig` (the bootstrap resamples; 0 keeps the
    intervals stored in the results and runs no paired tests).

    Raises
    ------
    ValueError
        When no readable result is found (the message says how many files were unreadable).
    """
    config = config or ReportConfig()
    check_settings(config)
    results_dir = Path(results_dir)
    out = Path(out) if out is not None else results_dir / "report"
    problems: list[tuple[str, str]] = []
    rows, subset_rows = split_subset_rows(load_results(results_dir, problems=problems))
    if not rows and not subset_rows:
        extra = (f"; {len(problems)} file(s) look like results but cannot be read, e.g. "
                 f"{problems[0][0]}: {problems[0][1]}" if problems else "")
        raise FeatxError(f"no featx result files under {results_dir}{extra}. Write some with "
                         f"`featx fit-heads CACHE --out {results_dir}` or `featx finetune ... "
                         f"--out {results_dir}`.")
    ranked = rank_results(rows)
    repeats = annotate_repeats(ranked)
    notes: list[str] = []
    stats, verdicts = _statistics(ranked, config.bootstrap, notes, problems)
    main_groups = [g for g in ranked_groups(ranked) if g[0]["comparable"]]
    plots: dict[str, list[Path]] = {}
    for members in main_groups:
        suffix = "" if len(main_groups) == 1 else f"_{_slug(members[0]['group'])}"
        plots[members[0]["group"]] = _plots_for_group(members, out, suffix, notes)
        plots[members[0]["group"]] += _stat_plots(
            members, stats.get(members[0]["group"], GroupStats()), out, suffix, notes)
    curves = _curves(ranked, out, notes)
    efficiency = write_efficiency(subset_rows, out, notes)
    csv_path = _write_csv(out / "report.csv", ranked + _subset_csv_rows(subset_rows))
    md = _markdown(results_dir, ranked, plots, curves, out, problems, notes, verdicts,
                   repeats_markdown(repeats) + efficiency_markdown(efficiency, out))
    md_path = _write_atomic(out / "report.md", lambda f: f.write(md))
    from featx.report.html import write_html  # it renders this module's groups and columns
    html_path = write_html(out / "report.html", ranked, markdown=md, plots=plots, curves=curves,
                           problems=problems, notes=notes)
    if problems:
        notes.insert(0, f"{len(problems)} file(s) look like featx results but could not be "
                     "read: " + "; ".join(f"{p} ({why})" for p, why in problems))
    return {"table": format_table(ranked), "markdown": md_path, "csv": csv_path,
            "html": html_path,
            "plot": [p for ps in plots.values() for p in ps] + curves
            + list(efficiency["plots"].values()), "note": notes,
            "verdict": "\n".join(verdicts) or None}


def _subset_csv_rows(rows: Sequence[dict]) -> list[dict]:
    """Label-efficiency rows for report.csv: not ranked, in a group of their own."""
    return [{**r, "group": f"{r['dataset']} [label efficiency]", "comparable": False,
             "reason": "trained on a labelled subset of train", "rank": None, "best": "",
             "wall_s": r.get("run_s"), "extract_share_s": None} for r in rows]
