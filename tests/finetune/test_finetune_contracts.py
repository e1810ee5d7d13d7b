"""Fine-tuning contracts checked against independent computations (issue 10).

Each test recomputes a number the loop reports (test metrics, val loss, learning rates, a
weight update, pooled features) from the saved checkpoints with plain torch / numpy /
sklearn, so a loop that scores the wrong checkpoint, evaluates in train mode or with
augmentation, weights the loss with the wrong counts, caps focal gamma, pools by max,
ignores --backbone-lr-mult or mis-sets the cosine period gives other numbers.

Random-init resnet18 on 32 px digit images (a 1x1 last map, so every forward is cheap).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score
from torchvision import transforms as T

import featx.finetune.run as ft
from featx.config import FinetuneConfig
from featx.data import load_dataset
from featx.finetune import build_model, data_from_spec, finetune
from tests.builders import write_digits
from tests.builders import load_checkpoint as _load

N_CLASSES = 3


def _cfg(out, **kw) -> FinetuneConfig:
    base = dict(model="resnet18", weights="none", image_size=32, batch_size=64,
                optimizer="sgd", lr=0.05, backbone_lr_mult=0.25, scheduler="cosine",
                precision="fp32", workers=0, out_dir=out, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _imbalanced(root):
    """The digits split, with class 1 cut to 8 train images (val and test stay balanced),
    so weights from train counts differ from weights from all splits."""
    data = data_from_spec(load_dataset(root), workers=0)
    train, kept = [], 0
    for rel, lab in data.splits["train"]:
        if lab == 1:
            kept += 1
            if kept > 8:
                continue
        train.append((rel, lab))
    return dataclasses.replace(data, splits={**data.splits, "train": train})


def _logits(state: dict, data, split: str, transform: dict, pool: int = 1
            ) -> tuple[torch.Tensor, np.ndarray]:
    """Logits of the checkpoint ``state`` on ``split``: eval mode, resize + center crop only."""
    model = build_model("resnet18", "none", N_CLASSES, pool=pool)  # weights from state
    model.load_state_dict(state)
    model.eval()
    tf = T.Compose([T.Resize(transform["resize"], antialias=True),
                    T.CenterCrop(transform["crop"]), T.ToTensor(),
                    T.Normalize(transform["mean"], transform["std"])])
    items = data.splits[split]
    x = torch.stack([tf(Image.open(data.root / rel).convert("RGB")) for rel, _ in items])
    with torch.no_grad():
        return model(x).double(), np.array([lab for _, lab in items])


def _weighted_ce(logits: torch.Tensor, y: np.ndarray, counts: np.ndarray) -> float:
    """PyTorch's weighted mean: sum_i w_{y_i} * nll_i / sum_i w_{y_i}, w_c = n / (K n_c)."""
    w = counts.sum() / (len(counts) * counts)
    nll = -F.log_softmax(logits, 1).numpy()[np.arange(len(y)), y]
    return float((w[y] * nll).sum() / w[y].sum())


def _focal(logits: torch.Tensor, y: np.ndarray, gamma: float) -> float:
    p = F.softmax(logits, 1).numpy()[np.arange(len(y)), y]
    return float(np.mean(-((1 - p) ** gamma) * np.log(p)))


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory):
    """3 epochs, weighted loss, augmentation on; the val losses the loop sees are scripted
    so that epoch 1 is the best while training goes on to epoch 3. The real val losses it
    computed are kept."""
    tmp = tmp_path_factory.mktemp("contracts")
    data = _imbalanced(write_digits(tmp / "digits"))
    real_val, scripted = [], iter([0.1, 0.5, 0.9])
    real_evaluate = ft.evaluate

    def evaluate(model, criterion, loader, *args, **kwargs):
        out = real_evaluate(model, criterion, loader, *args, **kwargs)
        if loader.dataset.items is data.splits["val"]:
            real_val.append(out["loss"])
            out = {**out, "loss": next(scripted)}
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ft, "evaluate", evaluate)
        res = finetune(data, _cfg(tmp / "out", epochs=3, loss="weighted", augment=True))
    return data, res, real_val


def test_test_metrics_come_from_best_pt_scored_with_scores_in_eval_mode(weighted_run):
    data, res, _ = weighted_run
    assert res.best_epoch == 1 and len(res.history) == 3
    transform = res.result["settings"]["transform"]
    best = _load(res.run_dir / "best.pt")
    assert best["epoch"] == 1
    logits, y = _logits(best["model"], data, "test", transform)
    scores = F.softmax(logits, 1).numpy()
    m = res.result["metrics"]
    auc = roc_auc_score(y, scores, multi_class="ovr", average="macro")
    assert m["roc_auc"] == pytest.approx(auc, abs=1e-9)
    pred = scores.argmax(1)
    cm = np.zeros((N_CLASSES, N_CLASSES), int)
    np.add.at(cm, (y, pred), 1)
    assert m["confusion_matrix"] == cm.tolist()
    # what the same numbers would be from the last epoch's model, or from hard labels: the
    # checks above could not pass with either
    last_logits, _ = _logits(_load(res.run_dir / "last.pt")["model"], data, "test", transform)
    last_auc = roc_auc_score(y, F.softmax(last_logits, 1).numpy(), multi_class="ovr")
    assert abs(last_auc - auc) > 1e-3
    hard_auc = roc_auc_score(y, np.eye(N_CLASSES)[pred], multi_class="ovr")
    assert abs(hard_auc - auc) > 1e-3


def test_val_loss_is_the_weighted_training_loss_in_eval_mode_without_augmentation(
        weighted_run):
    data, res, real_val = weighted_run
    transform = res.result["settings"]["transform"]
    train_counts = np.bincount([lab for _, lab in data.splits["train"]], minlength=N_CLASSES)
    all_counts = sum(np.bincount([lab for _, lab in items], minlength=N_CLASSES)
                     for items in data.splits.values())
    assert train_counts.tolist() != (all_counts * train_counts.sum() / all_counts.sum()).tolist()
    for epoch, ckpt in ((1, "best.pt"), (3, "last.pt")):  # the models of those epochs
        state = _load(res.run_dir / ckpt)
        assert state["epoch"] == epoch
        logits, y = _logits(state["model"], data, "val", transform)
        expected = _weighted_ce(logits, y, train_counts)
        assert real_val[epoch - 1] == pytest.approx(expected, rel=1e-5), epoch
        # what plain cross-entropy or weights from every split would give instead
        assert abs(F.cross_entropy(logits, torch.from_numpy(y)).item() - expected) > 1e-4
        assert abs(_weighted_ce(logits, y, all_counts) - expected) > 1e-4


def test_cosine_schedule_reaches_zero_after_the_last_epoch_and_lr_mult_sets_the_backbone(
        weighted_run):
    _, res, _ = weighted_run
    lr, epochs = 0.05, 3
    expected = [lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert [row["lr"] for row in res.history] == pytest.approx(expected, rel=1e-9)
    groups = {g["name"]: g for g in _load(res.run_dir / "last.pt")["optimizer"]["param_groups"]}
    assert groups["head"]["initial_lr"] == pytest.approx(lr)
    assert groups["backbone"]["initial_lr"] == pytest.approx(lr * 0.25)
    # last.pt holds the lr for the epoch after the last: zero
    assert groups["head"]["lr"] == pytest.approx(0, abs=1e-12)
    assert groups["backbone"]["lr"] == pytest.approx(0, abs=1e-12)


def test_focal_val_loss_uses_the_uncapped_gamma(tmp_path):
    data = _imbalanced(write_digits(tmp_path / "digits", per_class=20))
    res = finetune(data, _cfg(tmp_path / "out", epochs=1, loss="focal", focal_gamma=6.0,
                              augment=False, pool=2))
    # resnet18's last map is 1x1 at 32 px: pool 2 trains, and says what it is
    assert any("--pool 2 is larger than resnet18's last spatial map at 32 px (1x1)" in n
               for n in res.notes)
    logits, y = _logits(_load(res.run_dir / "best.pt")["model"], data, "val",
                        res.result["settings"]["transform"], pool=2)
    expected = _focal(logits, y, 6.0)
    assert res.history[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    for other in (0.0, 2.0, 5.0):  # what a capped gamma (or plain CE) would give
        assert abs(_focal(logits, y, other) - expected) > 1e-4


def test_one_sgd_step_moves_the_backbone_by_lr_times_mult(tmp_path):
    """Epoch 1 is one batch, so the first SGD step (momentum buffer = gradient) is the whole
    update: head weights move by -lr * grad, backbone weights by -lr * mult * grad."""
    data = _imbalanced(write_digits(tmp_path / "digits", per_class=12))
    cfg = _cfg(tmp_path / "out", epochs=1, lr=0.1, backbone_lr_mult=0.25, scheduler="none",
               loss="ce", augment=False)
    res = finetune(data, cfg)
    after = _load(res.run_dir / "last.pt")["model"]
    model = build_model("resnet18", "none", N_CLASSES, seed=cfg.seed).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = res.result["settings"]["transform"]
    tf = T.Compose([T.Resize(t["resize"], antialias=True), T.CenterCrop(t["crop"]),
                    T.ToTensor(), T.Normalize(t["mean"], t["std"])])
    x = torch.stack([tf(Image.open(data.root / rel).convert("RGB"))
                     for rel, _ in data.splits["train"]])
    y = torch.tensor([lab for _, lab in data.splits["train"]])
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        delta = (after[name] - before[name]).double().flatten()
        g = p.grad.double().flatten()
        slope = float(delta @ g / (g @ g))  # least squares: delta = slope * grad
        want = -0.1 if name.startswith("head.") else -0.1 * 0.25
        assert slope == pytest.approx(want, rel=2e-3), name


def test_pool_n_head_reads_the_average_not_the_max_of_the_map():
    torch.manual_seed(0)
    model = build_model("resnet18", "none", N_CLASSES, pool=2).eval()
    x = torch.randn(2, 3, 128, 128)  # resnet18's last map: 4x4, so pool 2 averages 2x2 cells
    b = model.backbone
    with torch.no_grad():
        fmap = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
        assert fmap.shape[-2:] == (4, 4)
        cells = fmap.reshape(2, 512, 2, 2, 2, 2).mean(dim=(3, 5))  # (B, C, 2, 2) block means
        expected = model.head(cells.flatten(1))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        as_max = model.head(fmap.reshape(2, 512, 2, 2, 2, 2).amax(dim=(3, 5)).flatten(1))
        assert not torch.allclose(as_max, expected, atol=1e-3)
