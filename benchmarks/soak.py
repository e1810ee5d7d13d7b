#!/usr/bin/env python
"""Soak: `featx extract` killed with SIGKILL at random points of a long run, resumed each time.

Writes N small generated PNGs (10 classes, a class pattern plus noise), runs one extraction
uninterrupted, then the same extraction again into another folder, killed ``--kills`` times at
random points and resumed after each kill, and compares the two caches: the same rows, paths,
labels and split lists, and features equal to float32 rounding (each resumed process computes
its own batches). Not part of the unit suite: ``make soak`` or::

    python benchmarks/soak.py --images 100000 --kills 5
    python benchmarks/soak.py --images 2000 --kills 3      # a quick look
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--model", "mobilenet_v2", "--weights", "none", "--image-size", "32", "--pool", "1,2",
         "--precision", "fp32", "--device", "cpu", "--no-progress"]


def write_images(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` 16x16 grayscale PNGs in 10 class folders, written once (a marker says so)."""
    from PIL import Image
    marker = root / ".soak"
    if marker.is_file() and marker.read_text() == str(n):
        return root
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(10, 16, 16))
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % 10
        img = np.clip(patterns[c] + rng.normal(0, 40, size=(16, 16)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "L").save(root / f"class{c}" / f"{i:06d}.png")
    marker.write_text(str(n))
    return root


def _env() -> dict:
    env = {**os.environ, "FEATX_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _extract(data: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "featx.cli", "extract", "--data", str(data),
                             "--out", str(out), *MODEL], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def run_uninterrupted(data: Path, out: Path) -> float:
    t0 = time.perf_counter()
    proc = _extract(data, out)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"uninterrupted extract failed: {err.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def run_killed(data: Path, out: Path, kills: int, whole_s: float, seed: int) -> dict:
    """Kill at ``kills`` random points (each a random share of the uninterrupted time after a
    start), resume after each, then let the last run finish."""
    rng = random.Random(seed)
    done_kills, starts, t0 = 0, 0, time.perf_counter()
    while True:
        proc = _extract(data, out)
        starts += 1
        if done_kills < kills:
            delay = rng.uniform(0.1, 0.3) * whole_s
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                done_kills += 1
                continue
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"resumed extract failed: {err.strip().splitlines()[-1:]}")
        resumed = "resum" in err
        return {"kills": done_kills, "starts": starts, "seconds": time.perf_counter() - t0,
                "last_said_resumed": resumed}


def compare(a: Path, b: Path) -> dict:
    """Rows compared and the largest feature difference; raises on any structural mismatch."""
    rows, worst = 0, 0.0
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        assert fa.attrs["complete"] and fb.attrs["complete"]
        for split in ("train", "val", "test"):
            ga, gb = fa[split], fb[split]
            assert set(ga) == set(gb), split
            np.testing.assert_array_equal(ga["labels"][:], gb["labels"][:])
            assert list(ga["paths"].asstr()[:]) == list(gb["paths"].asstr()[:])
            for name in ga:
                if name in ("labels", "paths"):
                    continue
                x, y = ga[name][:], gb[name][:]
                assert x.shape == y.shape, (split, name)
                # another process per resume: float32 rounding may differ, nothing more
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
                worst = max(worst, float(np.abs(x - y).max()) if x.size else 0.0)
            rows += ga["labels"].shape[0]
            for key in ("paths", "labels"):
                assert list(fa[f"split/{split}/{key}"][:]) == list(fb[f"split/{split}/{key}"][:])
    return {"rows": rows, "max_abs_diff": worst}


def cpu_kind() -> str:
    try:
        flags = set(re.findall(r"\b(avx512_bf16|amx_tile|avx512f|avx2)\b",
                               Path("/proc/cpuinfo").read_text()))
    except OSError:
        flags = set()
    kind = ("AMX" if "amx_tile" in flags else "AVX-512-BF16" if "avx512_bf16" in flags
            else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?")
    return f"{platform.machine()} {kind}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "cache" / "soak")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    data = write_images(args.work / f"images-{args.images}", args.images)
    write_s = time.perf_counter() - t0
    whole_dir, killed_dir = args.work / "whole", args.work / "killed"
    for d in (whole_dir, killed_dir):
        for f in d.glob("*") if d.is_dir() else []:
            f.unlink()
    whole_s = run_uninterrupted(data, whole_dir)
    killed = run_killed(data, killed_dir, args.kills, whole_s, args.seed)
    (a,), (b,) = list(whole_dir.glob("*.h5")), list(killed_dir.glob("*.h5"))
    same = compare(a, b)
    print(f"soak on {cpu_kind()}: {args.images} images (written in {write_s:.0f} s); "
          f"uninterrupted {whole_s:.0f} s; {killed['kills']} SIGKILLs, {killed['starts']} "
          f"starts, {killed['seconds']:.0f} s in all; {same['rows']} rows compared: paths, "
          f"labels and split lists equal, features within {same['max_abs_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
