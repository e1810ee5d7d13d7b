"""The result record both ``fit-heads`` and ``finetune`` write and ``report`` reads.

:func:`make_result` builds the one schema (JSON), :func:`write_json` writes it atomically and
:func:`read_result` reads it back; :func:`head_result_path` and :func:`finetune_result_path`
say where the records live; :data:`METRIC_COLUMNS` is the one list of metrics the tables
show (report.md/csv, the terminal tables, heads_summary.csv). A new metric: compute it in
:func:`featx.metrics.classification_metrics`, add its :class:`Column` here.
"""
from __future__ import annotations

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
    "finetune_result_path",
    "head_model_path",
    "head_result_path",
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


@dataclass(frozen=True)
class Column:
    """One reported test metric and how the tables show it.

    ``key`` is its key in ``result["metrics"]``; its CSV column (report.csv,
    heads_summary.csv) is ``test_{key}`` (:attr:`name`). ``header``/``fmt``: the report's
    table (terminal and report.md); ``short``/``short_fmt``: the fit-heads terminal table.
    """

    key: str
    header: str
    short: str
    fmt: str = ".4f"
    short_fmt: str = ".3f"

    @property
    def name(self) -> str:
        return f"test_{self.key}"


# in table order; the fit-heads table puts balanced accuracy (what it sorts by) first
METRIC_COLUMNS: tuple[Column, ...] = (
    Column("accuracy", "test acc", "acc"),
    Column("balanced_accuracy", "bal. acc", "bal_acc"),
    Column("macro_f1", "macro F1", "f1"),
    Column("roc_auc", "ROC-AUC", "auc"),
)


def make_result(*, kind: str, method: str, dataset: dict, model: str, metrics: dict,
                timings: dict, settings: dict | None = None, selection: dict | None = None,
                feature: str | None = None, head: str | None = None,
                provenance: dict | None = None, artifacts: dict | None = None,
                repeat: dict | None = None, train_subset: dict | None = None) -> dict:
    """One result record, the same schema for heads (``kind="head"``) and fine-tuning.

    ``dataset`` must hold ``name``, ``classes``, ``split_fingerprint`` (all splits' file lists)
    and ``test_fingerprint`` (the test list), which ``report`` uses to decide comparability.
    ``timings`` are wall seconds (``fit_s``, ``predict_s``, ``total_s``, ...). ``repeat``
    (:func:`repeat_record`) says which experiment this is one repeat of; ``train_subset``
    (:func:`featx.data.subsets.subset_record`) the labelled subset it was trained on.
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
