"""Fine-tuning under torchrun: 2 gloo ranks on the CPU against one process.

The controlled setting makes the two runs compute the same thing: the backbone is frozen
(its BatchNorm in eval mode, so the batch composition cannot move it), no augmentation, fp32,
and the global batch equal (one process with batch 12, two ranks with 6 each, 24 train
images). DDP's average of the two ranks' mean gradients is then the single process's mean
gradient, up to float rounding. 9 test images (odd) make DistributedSampler-style padding
show up as a count of 10.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featx import distributed
from featx.config import FinetuneConfig
from featx.data import load_dataset
from featx.finetune import data_from_spec, finetune
from tests.builders import load_checkpoint as _load
from tests.builders import write_digits

REPO = Path(__file__).resolve().parents[2]
N_TEST = 9

# Runs featx's CLI like `-m featx`, recording which rank writes which file, and optionally
# killing rank 1 (SIGKILL, as a node failure would) when it starts a given epoch.
_RECORDING_MAIN = """
import os, signal
from pathlib import Path
import featx.finetune.run as ft
rank = int(os.environ["RANK"])
log = open(os.path.join(os.environ["FEATX_TEST_LOG"], f"rank{rank}.log"), "a")
def recorded(fn):
    def wrapper(*args):
        path = next(a for a in args if isinstance(a, Path))
        log.write(f"{path.name}\\n"); log.flush()
        return fn(*args)
    return wrapper
ft.save_checkpoint = recorded(ft.save_checkpoint)
ft.write_history = recorded(ft.write_history)
ft.write_json = recorded(ft.write_json)
die_in = int(os.environ.get("FEATX_TEST_KILL_RANK1_IN_EPOCH", 0))
real_train, epochs = ft.train_one_epoch, []
def train(*args, **kwargs):
    epochs.append(1)
    if rank == 1 and len(epochs) == die_in:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_train(*args, **kwargs)
ft.train_one_epoch = train
from featx.cli import main
main()
"""


def _write_manifest(root: Path) -> Path:
    """14 digits per class: 8 train, 3 val, 3 test (24 / 9 / 9 images)."""
    write_digits(root, per_class=14)
    rows = []
    for label in sorted(p.name for p in root.iterdir()):
        files = sorted((root / label).glob("*.png"))
        for k, f in enumerate(files):
            split = "train" if k < 8 else "val" if k < 11 else "test"
            rows.append((f"{label}/{f.name}", label, split))
    path = root / "manifest.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    return path


SETTINGS = dict(model="resnet18", weights="none", image_size=32, epochs=2, freeze="backbone",
                augment=False, precision="fp32", optimizer="adam", lr=1e-2, workers=0, seed=0)


def _cli_args(manifest: Path, out: Path, batch_size: int) -> list[str]:
    args = ["finetune", "--data", str(manifest), "--out", str(out), "--batch-size",
            str(batch_size), "--no-augment", "--no-progress"]
    for key in ("model", "weights", "image_size", "epochs", "freeze", "precision", "optimizer",
                "lr", "workers", "seed"):
        args += [f"--{key.replace('_', '-')}", str(SETTINGS[key])]
    return args


def _torchrun(tmp: Path, args: list[str], **env) -> subprocess.CompletedProcess:
    log_dir = tmp / "ranklogs"
    log_dir.mkdir(exist_ok=True)
    entry = tmp / "recording_main.py"
    entry.write_text(_RECORDING_MAIN)
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO), os.environ.get("PYTHONPATH", "")]), "FEATX_TEST_LOG": str(log_dir),
        "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", str(entry), *args]
    return subprocess.run(cmd, cwd=tmp, env=environ, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (batch 12); two ranks (6 each) with rank 1 killed in epoch 2, then resumed.

    Two torchrun launches, not three: the resumed run is the one compared with the single
    process (each torchrun start costs several seconds of imports on 2 cores).
    """
    tmp = tmp_path_factory.mktemp("ddp")
    manifest = _write_manifest(tmp / "digits")
    single = finetune(data_from_spec(load_dataset(manifest), workers=0),
                      FinetuneConfig(**SETTINGS, batch_size=12, out_dir=tmp / "single",
                                     progress=False))
    args = _cli_args(manifest, tmp / "out", 6)
    killed = _torchrun(tmp, args, FEATX_TEST_KILL_RANK1_IN_EPOCH="2")
    (run_dir,) = (tmp / "out").iterdir()
    after_kill = dict(epoch=_load(run_dir / "last.pt")["epoch"],
                      files=sorted(p.name for p in run_dir.iterdir()),
                      rank0=(tmp / "ranklogs" / "rank0.log").read_text().split())
    resumed = _torchrun(tmp, args + ["--resume"])
    return dict(tmp=tmp, single=single, killed=killed, after_kill=after_kill, resumed=resumed,
                run_dir=run_dir)


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])
    return json.loads(path.read_text())


def test_killing_one_rank_leaves_the_last_finished_epoch(runs):
    assert runs["killed"].returncode != 0
    after = runs["after_kill"]
    assert after["epoch"] == 1
    assert after["files"] == ["best.pt", "history.csv", "last.pt"]
    assert after["rank0"] == ["best.pt", "last.pt", "history.csv"]


def test_resumed_under_torchrun_writes_one_result_scoring_every_test_image_once(runs):
    proc = runs["resumed"]
    result = _result(proc)
    results = list((runs["tmp"] / "out").rglob("result.json"))
    assert results == [runs["run_dir"] / "result.json"]
    # the CLI prints the path once (rank 0 only), not once per rank
    assert proc.stdout.strip().splitlines() == [str(results[0])]
    assert proc.stderr.count("resuming") == 1 and proc.stderr.count("epoch 2/2: train") == 1
    assert result["selection"]["resumed"] is True and result["selection"]["epochs_run"] == 2
    m = result["metrics"]
    assert m["n"] == N_TEST == result["dataset"]["counts"]["test"]
    assert int(np.asarray(m["confusion_matrix"]).sum()) == N_TEST
    s = result["settings"]
    assert (s["world_size"], s["global_batch_size"], s["batch_size"]) == (2, 12, 6)
    assert s["distributed_backend"] == "gloo"


def test_only_rank_0_writes_checkpoints_history_and_result(runs):
    logs = runs["tmp"] / "ranklogs"
    assert not (logs / "rank1.log").read_text().strip()
    rank0 = (logs / "rank0.log").read_text().split()
    assert rank0.count("last.pt") == 2 and rank0.count("history.csv") == 2
    assert rank0.count("result.json") == 1


def test_two_ranks_equal_one_process_at_the_same_global_batch(runs):
    single, result = runs["single"], _result(runs["resumed"])
    ms, md = single.result["metrics"], result["metrics"]
    # predictions (and the counts from them) exactly: the weights agree to 1e-6 and no test
    # image's logits are that close to a tie; the continuous values to a stated tolerance
    assert md["confusion_matrix"] == ms["confusion_matrix"]
    assert md["accuracy"] == ms["accuracy"]
    assert md["balanced_accuracy"] == ms["balanced_accuracy"]
    assert md["roc_auc"] == pytest.approx(ms["roc_auc"], abs=1e-6)
    assert result["selection"]["best_epoch"] == single.best_epoch
    assert result["dataset"]["split_fingerprint"] == single.result["dataset"]["split_fingerprint"]
    with open(runs["run_dir"] / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    assert len(history) == len(single.history) == 2
    for row, ref in zip(history, single.history):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert float(row[key]) == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    wd = _load(runs["run_dir"] / "best.pt")["model"]
    ws = _load(single.run_dir / "best.pt")["model"]
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(wd[key], ws[key], rtol=1e-5, atol=1e-6)


def test_outside_torchrun_the_helpers_act_on_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    env = distributed.init_process_group("cpu")
    assert (env.rank, env.world_size, env.distributed, env.is_main) == (0, 1, False, True)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.run_on_main(lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        distributed.run_on_main(lambda: 1 / 0)


def test_bad_torchrun_variables_are_named(monkeypatch):
    monkeypatch.setenv("RANK", "two")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK='two'"):
        distributed.dist_env()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="0 <= RANK < WORLD_SIZE"):
        distributed.dist_env()


def test_python_dash_m_featx_is_the_cli():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "featx", "finetune", "--help"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "torchrun --nproc-per-node" in r.stdout and "per process" in r.stdout


def test_cuda_under_torchrun_without_a_gpu_for_this_rank_is_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from featx.cli import main
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="LOCAL_RANK 1 has no GPU: this node sees 1"):
        distributed.init_process_group("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = CliRunner().invoke(main, ["finetune", "--model", "resnet18", "--data", str(tmp_path),
                                  "--device", "cuda", "--no-progress"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == (
        "Error: --device cuda: no CUDA device is available here; use --device cpu (gloo) or "
        "run where GPUs are.")
    assert not torch.distributed.is_initialized()


def test_two_ranks_train_the_cut_network_as_one_process(tmp_path):
    # the controlled setting of this file's other tests (frozen trunk, fp32, no augmentation, the
    # same global batch), with the network cut after layer2: torchrun's 2 gloo ranks
    # compute what one process computes, up to float rounding
    manifest = _write_manifest(tmp_path / "digits")
    single = finetune(data_from_spec(load_dataset(manifest), workers=0),
                      FinetuneConfig(**SETTINGS, batch_size=12, cut="layer2",
                                     out_dir=tmp_path / "single", progress=False))
    result = _result(_torchrun(tmp_path, _cli_args(manifest, tmp_path / "out", 6)
                               + ["--cut", "layer2"]))
    assert result["cut"] == "layer2" and result["settings"]["world_size"] == 2
    assert result["metrics"]["confusion_matrix"] == single.result["metrics"]["confusion_matrix"]
    (run_dir,) = (tmp_path / "out").iterdir()
    assert "-at-layer2-" in run_dir.name  # (batch sizes differ, and so the hashes)
    wd, ws = _load(run_dir / "best.pt")["model"], _load(single.run_dir / "best.pt")["model"]
    for key in ("head.weight", "head.bias"):
        torch.testing.assert_close(wd[key], ws[key], rtol=1e-5, atol=1e-6)
