"""The result record both ``fit-heads`` and ``finetune`` write and ``report`` reads.

:func:`make_result` builds the one schema (JSON), :func:`write_json` writes it atomically and
:func:`read_result` reads it back; :func:`head_result_path` and :func:`finetune_result_path`
say where the records live; :data:`METRIC_COLUMNS` is the one list of metrics the tables
show (report.md/csv, the terminal tables, heads_summary.csv). A new metric: compute it in
:func:`featx.metrics.classification_metrics`, add its :class:`Column` here.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featx.errors import FeatxError
from featx.files import atomic_write

__all__ = [
    "FINETUNE_RESULT",
    "HEADS_DIR",
    "METRIC_COLUMNS",
    "RESULT_SCHEMA",
    "Column",
    "OUTPUTS_SUFFIX",
    "finetune_result_path",
    "head_model_path",
    "head_result_path",
    "image_outputs_path",
    "metric_cells",
    "read_image_outputs",
    "write_image_outputs",
    "make_result",
    "read_result",
    "repeat_record",
    "write_json",
]

RESULT_SCHEMA = "featx-result/1"

HEADS_DIR = "heads"              # {out}/{cache stem}/heads/ holds a cache's head results
FINETUNE_RESULT = "result.json"  # a fine-tuning run folder's result


def head_result_path(out_dir: str | Path, cache_stem: str, feature: str, head: str, *,
                     seed: int = 0, subset: str | None = None) -> Path:
    """``{out_dir}/{cache_stem}[_seed{S}]/heads/{feature}__{head}[__{subset}].json``: one
    fit-heads run's result. Another seed than 0 gets its own folder (a repeat over seeds
    keeps every seed's result), a labelled train subset (``shots4-d0``) its own name."""
    folder = f"{cache_stem}_seed{seed}" if seed else cache_stem
    name = f"{feature}__{head}" + (f"__{subset}" if subset else "")
    return Path(out_dir) / folder / HEADS_DIR / f"{name}.json"


def head_model_path(result_path: str | Path) -> Path:
    """The fitted pipeline (``.skops``, :mod:`featx.artifacts`) beside a head's result JSON."""
    return Path(result_path).with_suffix(".skops")


def finetune_result_path(run_dir: str | Path) -> Path:
    """``{run_dir}/result.json``: the result of one fine-tuning run."""
    return Path(run_dir) / FINETUNE_RESULT


OUTPUTS_SUFFIX = ".test_outputs.csv"


def image_outputs_path(result_path: str | Path) -> Path:
    """``{stem}.test_outputs.csv`` beside a result JSON: its per-image test outputs."""
    result_path = Path(result_path)
    return result_path.with_name(result_path.stem + OUTPUTS_SUFFIX)


def _output_columns(classes) -> list[str]:
    return ["path", "label", "pred"] + [f"score_{c}" for c in classes]


def write_image_outputs(path: str | Path, paths, y_true, y_pred, scores: np.ndarray,
                        classes) -> Path:
    """Write each test image's label, prediction and class scores as CSV, atomically.

    Columns ``path`` (the test file list, in its order), ``label`` and ``pred`` (class
    names) and ``score_{class}`` per class (``repr`` floats: they read back exactly).
    ``scores`` : ndarray of shape (n_images, n_classes); ``y_true``/``y_pred`` integer labels.
    """
    path = Path(path)
    scores = np.asarray(scores, dtype=np.float64)
    classes = [str(c) for c in classes]
    if scores.shape != (len(paths), len(classes)) or len(y_true) != len(paths) \
            or len(y_pred) != len(paths):
        raise ValueError(f"outputs of {len(paths)} images: labels {len(y_true)}, predictions "
                         f"{len(y_pred)}, scores {scores.shape}, {len(classes)} classes")
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(_output_columns(classes))
        for p, t, q, row in zip(paths, y_true, y_pred, scores.tolist()):
            w.writerow([p, classes[int(t)], classes[int(q)], *map(repr, row)])
    return path


def read_image_outputs(path: str | Path, result: dict) -> dict:
    """The per-image outputs at ``path`` of ``result``: ``paths`` (list), ``y_true`` and
    ``y_pred`` (int arrays of shape (n,)), ``scores`` (float array of shape (n, n_classes)).

    Raises :class:`FeatxError` (one line naming the file) when it is not the outputs of
    that result: other columns, another number of rows than ``metrics["n"]``, a label that
    is not one of its classes, a score that is not a number.
    """
    classes = [str(c) for c in (result.get("dataset") or {}).get("classes") or []]
    want = _output_columns(classes)
    n = (result.get("metrics") or {}).get("n")
    index = {c: i for i, c in enumerate(classes)}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FeatxError(f"{path}: cannot be read as per-image outputs ({type(exc).__name__})"
                         f"; re-run the command that wrote its result.") from None
    if not rows or rows[0] != want:
        raise FeatxError(f"{path}: columns {','.join(rows[0]) if rows else '(none)'} are not "
                         f"{','.join(want)}; not the outputs of its result. Re-run the command "
                         f"that wrote it.")
    body = rows[1:]
    if n != len(body):
        raise FeatxError(f"{path}: {len(body)} rows, but its result scored {n} test images; "
                         f"re-run the command that wrote it.")
    try:
        y_true = np.array([index[r[1]] for r in body], dtype=np.int64)
        y_pred = np.array([index[r[2]] for r in body], dtype=np.int64)
        scores = np.array([[float(v) for v in r[3:]] for r in body], dtype=np.float64)
    except (KeyError, ValueError, IndexError) as exc:
        raise FeatxError(f"{path}: a row holds a label that is not one of the classes or a "
                         f"score that is not a number ({type(exc).__name__}: {exc}); re-run "
                         f"the command that wrote it.") from None
    return {"paths": [r[0] for r in body], "y_true": y_true, "y_pred": y_pred,
            "scores": scores.reshape(len(body), len(classes))}


@dataclass(frozen=True)
class Column:
    """One reported test metric and how the tables show it.

    ``key`` is its key in ``result["metrics"]``; its CSV column (report.csv,
    heads_summary.csv) is ``test_{key}`` (:attr:`name`). ``header``/``fmt``: the report's
    table (terminal and report.md); ``short``/``short_fmt``: the fit-heads terminal table.
    ``interval``: the metric has a 95% interval (``result["metrics"]["intervals"][key]``),
    in the CSVs as the columns :attr:`lo_name` and :attr:`hi_name` (:attr:`names` gives all
    of a column's CSV names) and in the report's table as ``0.897 [0.873, 0.920]``.
    """

    key: str
    header: str
    short: str
    fmt: str = ".4f"
    short_fmt: str = ".3f"
    interval: bool = True

    @property
    def name(self) -> str:
        return f"test_{self.key}"

    @property
    def lo_name(self) -> str:
        return f"test_{self.key}_lo"

    @property
    def hi_name(self) -> str:
        return f"test_{self.key}_hi"

    @property
    def names(self) -> list[str]:
        """Its CSV columns: the value, then the interval's bounds where it has one."""
        return [self.name, self.lo_name, self.hi_name] if self.interval else [self.name]


# in table order; the fit-heads table puts balanced accuracy (what it sorts by) first
METRIC_COLUMNS: tuple[Column, ...] = (
    Column("accuracy", "test acc", "acc"),
    Column("balanced_accuracy", "bal. acc", "bal_acc"),
    Column("macro_f1", "macro F1", "f1"),
    Column("roc_auc", "ROC-AUC", "auc"),
    # calibration, from class probabilities only (None for decision-score heads)
    Column("ece", "ECE", "ece", interval=False),
    Column("brier", "Brier", "brier"),
)


def metric_cells(metrics: dict) -> dict[str, float | None]:
    """The CSV cells of :data:`METRIC_COLUMNS` from a result's ``metrics``: ``test_{key}``,
    and ``test_{key}_lo`` / ``_hi`` from ``metrics["intervals"]`` (None where absent)."""
    def num(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
            and math.isfinite(v) else None
    intervals = metrics.get("intervals") if isinstance(metrics.get("intervals"), dict) else {}
    cells = {}
    for c in METRIC_COLUMNS:
        cells[c.name] = num(metrics.get(c.key))
        if c.interval:
            iv = intervals.get(c.key)
            ok = isinstance(iv, (list, tuple)) and len(iv) == 2
            cells[c.lo_name] = num(iv[0]) if ok else None
            cells[c.hi_name] = num(iv[1]) if ok else None
    return cells


def make_result(*, kind: str, method: str, dataset: dict, model: str, metrics: dict,
                timings: dict, settings: dict | None = None, selection: dict | None = None,
                feature: str | None = None, head: str | None = None,
                provenance: dict | None = None, artifacts: dict | None = None,
                repeat: dict | None = None, train_subset: dict | None = None,
                cut: str | None = None) -> dict:
    """One result record, the same schema for heads (``kind="head"``) and fine-tuning.

    ``dataset`` must hold ``name``, ``classes``, ``split_fingerprint`` (all splits' file lists)
    and ``test_fingerprint`` (the test list), which ``report`` uses to decide comparability.
    ``timings`` are wall seconds (``fit_s``, ``predict_s``, ``total_s``, ...). ``repeat``
    (:func:`repeat_record`) says which experiment this is one repeat of; ``train_subset``
    (:func:`featx.data.subsets.subset_record`) the labelled subset it was trained on;
    ``cut`` the stage a fine-tuned network was truncated after (``finetune --cut``).
    """
    from featx import __version__
    for key in ("name", "classes", "split_fingerprint", "test_fingerprint"):
        if key not in dataset:
            raise ValueError(f"dataset info lacks {key!r}")
    return {
        "schema": RESULT_SCHEMA,
        "featx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kind": kind,
        "method": method,
        "model": model,
        "feature": feature,
        "head": head,
        "dataset": dataset,
        "settings": settings or {},
        "selection": selection or {},
        "metrics": metrics,
        "timings": timings,
        "provenance": provenance or {},
        "artifacts": artifacts or {},
        "repeat": repeat,              # None: not known (the report then skips it)
        "train_subset": train_subset,  # None: trained on all of train
        "cut": cut,                    # None: the whole network (and every head result)
    }


def repeat_record(experiment: dict, *, split_seed: int | None, seed: int) -> dict:
    """The ``repeat`` block of a result: ``experiment`` (sha256 of every setting that defines
    the experiment, the split and the seed left out), ``split_seed`` and ``seed``.

    Results of one dataset's files (``dataset.files_fingerprint``) with the same
    ``experiment`` are repeats of each other; ``report`` summarises them over their splits
    and seeds.
    """
    text = json.dumps(jsonable(experiment), sort_keys=True, default=str)
    return {"experiment": hashlib.sha256(text.encode()).hexdigest()[:16],
            "split_seed": split_seed, "seed": int(seed)}


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN; null reads back in pandas as NaN
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically (temporary file in the same folder, then replace)."""
    path = Path(path)
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=2)
        f.write("\n")
    return path


def read_result(path: str | Path) -> dict:
    """Load a result JSON and check its schema tag."""
    with open(path) as f:
        obj = json.load(f)
    if not isinstance(obj, dict) or obj.get("schema") != RESULT_SCHEMA:
        raise FeatxError(f"{path}: not a featx result (expected schema {RESULT_SCHEMA!r}, "
                         f"found {obj.get('schema') if isinstance(obj, dict) else None!r})")
    return obj
