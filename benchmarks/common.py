"""What benchmarks/run.py and benchmarks/peer_thingsvision.py share: where the checkout and
the images are, the image set and its seeded subsets, a child process's environment, and a
process's CPU time and memory. Imported as ``benchmarks.common``: the scripts run as modules
from the checkout (``python -m benchmarks.run``), so no sys.path edits are needed.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featx.data import DatasetSpec, load_dataset, write_digits_dataset

ROOT = Path(__file__).resolve().parents[1]
PNEUMONIA = ROOT.parent / "shared" / "data" / "pneumoniamnist"
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)


def child_env(**extra: str) -> dict:
    """os.environ with this checkout first on PYTHONPATH (and ``extra``), for a child that
    imports featx or benchmarks."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def cpu_s() -> float:
    """User + system CPU seconds of this process."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_kb(field: str = "VmRSS") -> int:
    """This process's resident memory (``VmHWM``: its peak) in KiB, from /proc."""
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith(field))


# --- images -----------------------------------------------------------------------------------

def write_digits(root: Path, size: int = 28) -> Path:
    """scikit-learn's digits 0/1/2 (all of them) in train/val/test class folders, 0.7/0.1/0.2
    of each class, by featx's one writer (featx.data.digits)."""
    return write_digits_dataset(root, size=size, classes=(0, 1, 2), seed=0,
                                split=(0.7, 0.1, 0.2))


def load_images(path: Path | None, work: Path) -> tuple[DatasetSpec, str]:
    if path is None and PNEUMONIA.is_dir():
        path = PNEUMONIA
    if path is not None:
        spec = load_dataset(path)
        return spec, f"{path} ({sum(len(v) for v in spec.splits.values())} images)"
    spec = load_dataset(write_digits(work / "digits"))
    return spec, ("scikit-learn digits 0-2 as 28x28 PNGs (pneumoniamnist not found at "
                  f"{PNEUMONIA})")


def subset(spec: DatasetSpec, n: int, seed: int = 0) -> DatasetSpec:
    """``n`` images (0: all), split 0.7/0.1/0.2 over train/val/test, each split sampled per
    class in proportion, seeded: the same subset every run."""
    if n <= 0:
        return spec
    rng = np.random.default_rng(seed)
    splits = {}
    for (split, items), frac in zip(spec.splits.items(), SPLIT_FRACTIONS):
        want = max(len(spec.classes), round(n * frac))
        by_class: dict[int, list] = {}
        for rel, lab in items:
            by_class.setdefault(lab, []).append((rel, lab))
        picked = []
        for lab, rows in sorted(by_class.items()):
            k = max(1, round(want * len(rows) / len(items)))
            picked += [rows[i] for i in sorted(rng.choice(len(rows), min(k, len(rows)),
                                                          replace=False))]
        splits[split] = sorted(picked)
    return DatasetSpec(spec.root, spec.name, spec.classes, splits, spec.layout)


def all_items(spec: DatasetSpec) -> list[tuple[str, int, str]]:
    """(relative path, label, split) of every image in ``spec``."""
    return [(rel, lab, s) for s, items in spec.splits.items() for rel, lab in items]
