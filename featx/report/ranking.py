"""Every featx result under a folder, grouped by dataset and split and ranked.

:func:`load_results` reads every featx result JSON under a folder (their schema is
:mod:`featx.results`), :func:`rank_results` groups them by dataset and split, works out each
row's wall time and ranks the rows within their group; :mod:`featx.report` prints and
writes them.

Rules the ranking follows (also written into ``report.md``):

- **Groups.** Results are ranked only against results of the same dataset *and* the same
  split. Per dataset name the split with the most results (ties: the most recent) is the
  *main* group; results on any other split are *not comparable* and listed apart, with the
  reason: ``test set differs`` (other test images) or ``split differs (same test set)``
  (same test images, other train/val images).
- **Order.** Within a group, by test balanced accuracy (then accuracy, then shorter wall
  time). ``best head`` marks the first frozen-head row of a group, ``best finetune`` the
  first fine-tuning row.
- **Wall time.** Fine-tuning: the whole run (``timings.total_s``). A head: its own run
  (selection, refit, test prediction, loading: ``total_s - extract_s``) plus its share of
  the extraction, which is the cache's whole extraction time divided by the number of head
  results in the report that come from that cache (one forward pass serves them all).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from featx.errors import FeatxError
from featx.results import FINETUNE_RESULT, HEADS_DIR, RESULT_SCHEMA, metric_cells

__all__ = ["COMPARABLE_RULE", "RANK_RULE", "WALL_TIME_RULE", "load_results", "rank_results"]

BEST_MARK = {"head": "best head", "finetune": "best finetune"}

WALL_TIME_RULE = (
    "fine-tuning = the whole run (timings.total_s); a head = its own run "
    "(selection, refit, test prediction, loading: total_s - extract_s) plus its share of the "
    "extraction = the cache's whole extraction time / the number of head results in this "
    "report that come from that cache.")
RANK_RULE = (
    "ranked within one dataset and split by test balanced accuracy (ties: accuracy, then "
    "shorter wall time); 'best head' marks the top frozen-head row, 'best finetune' the top "
    "fine-tuning row of each group.")
COMPARABLE_RULE = (
    "per dataset name, the split (split_fingerprint) with the most results is the main group; "
    "results on another split are not comparable and listed apart: 'test set differs' (other "
    "test images) or 'split differs (same test set)' (other train/val images).")


# --- loading ---------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _looks_like_result(path: Path, text: str) -> bool:
    # Other JSON (summaries, configs, notebooks' metadata) is skipped without a word; a file
    # that names the schema or has the fine-tuning result's name is one the user expects to see.
    return "featx-result" in text or path.name == FINETUNE_RESULT


@dataclass(frozen=True)
class _Result:
    """The parts of one result JSON that the report reads, checked by :meth:`from_json`."""

    raw: dict
    kind: str
    method: str
    model: str
    dataset: dict
    metrics: dict
    timings: dict
    artifacts: dict
    provenance: dict

    @classmethod
    def from_json(cls, res: Any) -> _Result:
        """``res`` checked; raises ValueError naming the first missing piece."""
        if not isinstance(res, dict):
            raise FeatxError("not a JSON object")
        if res.get("schema") != RESULT_SCHEMA:
            raise FeatxError(f"schema {res.get('schema')!r}, expected {RESULT_SCHEMA!r}")
        for key in ("kind", "method", "model"):
            if not isinstance(res.get(key), str) or not res[key]:
                raise FeatxError(f"{key!r} missing or not a string")
        ds, metrics = res.get("dataset"), res.get("metrics")
        if not isinstance(ds, dict):
            raise FeatxError("'dataset' missing")
        for key in ("name", "split_fingerprint", "test_fingerprint"):
            if not isinstance(ds.get(key), str):
                raise FeatxError(f"'dataset.{key}' missing")
        if not isinstance(metrics, dict) or "balanced_accuracy" not in metrics:
            raise FeatxError("'metrics.balanced_accuracy' missing")
        timings = _section(res, "timings")
        for key, value in timings.items():
            # a time that is not a number would rank as 0 s (or last); the row cannot be placed
            if key.endswith("_s") and value is not None and _num(value) is None \
                    and not isinstance(value, list):
                raise FeatxError(f"'timings.{key}' is not a number ({value!r})")
        return cls(res, res["kind"], res["method"], res["model"], ds, metrics, timings,
                   _section(res, "artifacts"), _section(res, "provenance"))


def _section(res: dict, key: str) -> dict:
    return res.get(key) if isinstance(res.get(key), dict) else {}


def _head_run_s(timings: dict, extract_s: float) -> float | None:
    """A head's own run: ``total_s - extract_s``, else the sum of the parts recorded."""
    total = _num(timings.get("total_s"))
    if total is not None:
        return max(total - extract_s, 0.0)
    parts = [_num(timings.get(k)) for k in ("load_s", "select_s", "fit_s", "predict_s",
                                            "reduce_s")]
    return sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None


def _cache_key(r: _Result) -> tuple[str, str, str, str]:
    """One extraction pass = one cache file as it was when these heads read it; the split
    views of a cache (featx resplit) share its pass."""
    view = r.provenance.get("split_view")
    if isinstance(view, dict) and view.get("parent"):
        parent = Path(str(r.artifacts.get("cache") or "")).parent / str(view["parent"])
        return (os.path.normpath(parent), str(view.get("parent_created") or ""), r.model, "")
    return (str(r.artifacts.get("cache") or ""), str(r.provenance.get("created") or ""),
            r.model, r.dataset["split_fingerprint"])


def _row_from_result(res: Any, path: Path, root: Path) -> dict:
    """The flat row of one parsed result; raises ValueError naming the first missing piece."""
    r = _Result.from_json(res)
    if r.kind == "head":
        extract_s = _num(r.timings.get("extract_s")) or 0.0
        run_s, cache_key = _head_run_s(r.timings, extract_s), _cache_key(r)
    else:
        extract_s, run_s, cache_key = None, _num(r.timings.get("total_s")), None
    return {
        "path": path,
        "source": path.relative_to(root).as_posix(),
        "result": res,
        "dataset": r.dataset["name"],
        "classes": list(r.dataset.get("classes") or []),
        "split_fingerprint": r.dataset["split_fingerprint"],
        "test_fingerprint": r.dataset["test_fingerprint"],
        "model": r.model,
        "method": r.method,
        "kind": r.kind,
        "feature": r.raw.get("feature"),
        "head": r.raw.get("head"),
        "created": str(r.raw.get("created") or ""),
        **metric_cells(r.metrics),  # the intervals stored in the result, if any
        "n_test": r.metrics.get("n"),
        "extract_s": extract_s,
        "run_s": run_s,
        "cache_key": cache_key,
    }


def load_results(results_dir: str | Path, *,
                 problems: list[tuple[str, str]] | None = None) -> list[dict]:
    """Read every featx result JSON under ``results_dir`` (recursively).

    Parameters
    ----------
    results_dir : str or Path
        Folder to search; hidden folders (``.name``) are left out.
    problems : list, optional
        When given, ``(relative path, reason)`` is appended for every file that looks like a
        featx result (names the ``featx-result`` schema, or is called ``result.json``) but
        cannot be read or lacks a field the report needs. Other JSON files are skipped
        silently.

    Returns
    -------
    list of dict, one per result file in path order, with ``dataset``, ``model``,
    ``method``, ``kind``, ``feature``, ``head``, ``test_accuracy``,
    ``test_balanced_accuracy``, ``test_macro_f1``, ``test_roc_auc`` (``None`` when undefined),
    ``n_test``, ``split_fingerprint``, ``test_fingerprint``, ``classes``, ``extract_s`` and
    ``run_s`` (seconds), ``source`` (path relative to ``results_dir``), ``path`` and
    ``result`` (the whole record).
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise FeatxError(f"results folder {str(root)!r} does not exist or is not a folder.")
    rows = []
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            if problems is not None:
                problems.append((rel.as_posix(), f"cannot be read ({exc.strerror or exc})"))
            continue
        if not _looks_like_result(path, text):
            continue
        try:
            rows.append(_row_from_result(json.loads(text), path, root))
        except json.JSONDecodeError as exc:
            if problems is not None:
                problems.append((rel.as_posix(), f"invalid JSON ({exc.msg}, line {exc.lineno})"))
        except ValueError as exc:
            if problems is not None:
                problems.append((rel.as_posix(), str(exc)))
    return rows


# --- grouping and ranking --------------------------------------------------------------------

def _sort_key(row: dict):
    def neg(v):
        return -v if v is not None else math.inf
    wall = row.get("wall_s")
    return (neg(row["test_balanced_accuracy"]), neg(row["test_accuracy"]),
            wall if wall is not None else math.inf, row["model"], row["method"], row["source"])


def _main_split(rows: list[dict]) -> str:
    counts = Counter(r["split_fingerprint"] for r in rows)
    latest = defaultdict(str)
    for r in rows:
        latest[r["split_fingerprint"]] = max(latest[r["split_fingerprint"]], r["created"])
    return max(counts, key=lambda fp: (counts[fp], latest[fp], fp))


def run_folder(source: str) -> str:
    parent = Path(source).parent
    if parent.name == HEADS_DIR:  # fit-heads writes {cache stem}/heads/{feature}__{head}.json
        parent = parent.parent
    return parent.as_posix() if parent.as_posix() != "." else Path(source).stem


def rank_results(rows: Sequence[dict]) -> list[dict]:
    """Group rows by dataset and split, add wall times, ranks and best marks.

    Parameters
    ----------
    rows : sequence of dict
        As returned by :func:`load_results`.

    Returns
    -------
    list of dict, copies of ``rows`` ordered by group (the main group of each dataset
    name, by name, then the groups that are not comparable) and within a group by rank, with
    ``group`` (the dataset name, or ``"name [split xxxxxxxx]"`` for a split that is not the
    main one), ``comparable`` (bool), ``reason`` (why not comparable, else ``""``), ``rank``
    (1 = best in its group), ``best`` (``"best head"``, ``"best finetune"`` or ``""``),
    ``extract_share_s`` and ``wall_s`` (see the module docstring for the rule). A method
    that occurs twice for the same model in one group (e.g. two caches of one model at other
    image sizes) gets its result folder appended in brackets.
    """
    rows = [dict(r) for r in rows]
    per_cache = Counter(r["cache_key"] for r in rows if r["kind"] == "head")
    for r in rows:
        if r["kind"] == "head":
            r["extract_share_s"] = (r["extract_s"] or 0.0) / per_cache[r["cache_key"]]
            r["wall_s"] = r["extract_share_s"] + (r["run_s"] or 0.0)
        else:
            r["extract_share_s"] = None
            r["wall_s"] = r["run_s"]

    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_name[r["dataset"]].append(r)
    main_groups, other_groups = [], []
    for name in sorted(by_name):
        named = by_name[name]
        main_fp = _main_split(named)
        main_test = next(r["test_fingerprint"] for r in named if r["split_fingerprint"] == main_fp)
        splits: dict[str, list[dict]] = defaultdict(list)
        for r in named:
            splits[r["split_fingerprint"]].append(r)
        for fp, members in splits.items():
            main = fp == main_fp
            if main:
                label, reason = name, ""
            else:
                label = f"{name} [split {fp[:8]}]"
                reason = ("test set differs" if members[0]["test_fingerprint"] != main_test
                          else "split differs (same test set)")
            for r in members:
                r.update(group=label, comparable=main, reason=reason)
            (main_groups if main else other_groups).append(members)

    out = []
    for members in main_groups + sorted(other_groups, key=lambda g: g[0]["group"]):
        twice = Counter((r["model"], r["method"]) for r in members)
        for r in members:
            if twice[(r["model"], r["method"])] > 1:
                r["method"] = f"{r['method']} [{run_folder(r['source'])}]"
        members.sort(key=_sort_key)
        marked = set()
        for i, r in enumerate(members, 1):
            r["rank"] = i
            r["best"] = ""
            mark = BEST_MARK.get(r["kind"])
            if mark and mark not in marked and r["test_balanced_accuracy"] is not None:
                r["best"] = mark
                marked.add(mark)
        out.extend(members)
    return out
