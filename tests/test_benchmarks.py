"""benchmarks/run.py --quick runs end to end and prints every row of its table.

No timing is asserted here: a test machine's speed says nothing about featx.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_prints_every_row(tmp_path):
    out = tmp_path / "bench.md"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.split("## all rows", 1)[1]
    for row in ["| extract resnet18", "| extract resnet50", "features resnet18: featx",
                "logistic test accuracy resnet18", "vs model-only ceiling",
                "| GPU: resnet50 / vgg16 bf16", "--precision bf16 vs fp32",
                "logistic test accuracy resnet18: bf16 vs fp32 features",
                "compile=True vs eager (images/s)", "| pool 1,2,4,8 in one pass vs pool 1 alone",
                "four separate passes", "E=1 epochs", "E=2 epochs", "test accuracy, E=2",
                "| peak RSS", "| fit-heads linear,logistic,svm,mlp"]:
        assert row in table, row
    header = "| measured | featx | reference | ratio | target | met |"
    assert header in table
    assert header in out.read_text() and "machine:" in out.read_text()


def test_only_selects_benchmarks_and_rejects_unknown_names():
    run = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"]
    r = subprocess.run(run + ["--only", "pools"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout.split("## all rows", 1)[1]
    assert "| pool 1,2,4,8" in table and "| extract resnet18" not in table
    r = subprocess.run(run + ["--only", "nope"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "choose from" in r.stderr
