"""timm backbones: penultimate and pool{n} equal to timm's own forward, weights, CLI, finetune.

Every model gets random weights that are saved to a .pth file and loaded back through
``--weights FILE``; the references are computed here from ``timm.create_model`` directly.
"""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

timm = pytest.importorskip("timm")

from featx.backbones import (  # noqa: E402
    FeatureModel,  # noqa: E402
    UnknownModelError,
    WeightsError,
    backbone_transform,
    build_backbone,
    forward_batch,
    get_backbone,
    prepare_for_inference,
    resolve_weights,
)
from featx.cli import main  # noqa: E402
from tests.builders import write_digits  # noqa: E402

# (timm name, image size): a CNN with BatchNorms (folded on extraction), a CNN with
# LayerNorms, the requested ViT at its own 224 px, a DINOv2 ViT with 4 register tokens
MODELS = [("resnet18", 64), ("convnext_atto", 64), ("vit_small_patch16_224", 224),
          ("vit_small_patch14_reg4_dinov2", 56)]
POOLS = (1, 2, 3)


def _reference_model(timm_name: str, size: int, seed: int = 0) -> torch.nn.Module:
    kw = {"img_size": size} if "vit" in timm_name else {}
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():  # non-trivial statistics, so BatchNorm folding can go wrong
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _reference_features(model, x: torch.Tensor, pools) -> dict[str, torch.Tensor]:
    """timm's own split, and pool{n} of its last map, written out independently of featx."""
    with torch.inference_mode():
        feats = model.forward_features(x)
        out = {"penultimate": model.forward_head(feats, pre_logits=True)}
        if feats.ndim == 3:  # tokens: drop cls/register tokens, patches back onto the grid
            gh, gw = model.patch_embed.grid_size
            patches = feats[:, model.num_prefix_tokens:]
            fmap = patches.reshape(len(x), gh, gw, -1).permute(0, 3, 1, 2)
        else:
            fmap = feats
        for n in pools:
            out[f"pool{n}"] = F.adaptive_avg_pool2d(fmap, n).flatten(1)
    return out


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.mark.parametrize("timm_name,size", MODELS)
def test_features_equal_timms_own_forward_through_a_weights_file(timm_name, size, tmp_path):
    ref = _reference_model(timm_name, size)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    name = f"timm:{timm_name}"
    spec = get_backbone(name)
    weights = resolve_weights(name, str(path))
    transform = backbone_transform(name, weights, size)
    assert transform.crop == size
    # the form extraction runs: BN folded, channels-last for CNNs only, uint8 batches
    fm = prepare_for_inference(FeatureModel(spec, build_backbone(name, weights,
                                                                   image_size=size)).eval())
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    got = forward_batch(fm, images, transform, POOLS, torch.device("cpu"), "fp32",
                   channels_last=spec.channels_last)
    cfg = timm.data.resolve_data_config({}, model=ref)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    want = _reference_features(ref, (images.float() / 255 - mean) / std, POOLS)
    assert set(got) == set(want)
    for key in want:
        assert got[key].shape == tuple(want[key].shape), key
        assert _rel(got[key], want[key]) < 1e-5, f"{timm_name} {key}: {_rel(got[key], want[key])}"
    assert want["pool2"].shape[1] == 4 * spec.spatial_channels
    if spec.layout == "tokens":
        # a ViT's pool1 is the mean of its patch tokens, penultimate timm's class token
        assert _rel(got["pool1"], got["penultimate"]) > 1e-2
    assert spec.channels_last == (spec.layout == "NCHW")


def test_transform_is_timms_eval_transform():
    """featx's resize/crop/normalise gives the same tensor as timm.data.create_transform."""
    name = "timm:vit_small_patch16_224"  # crop_pct 0.9, bicubic, mean/std 0.5
    transform = backbone_transform(name, resolve_weights(name, "none"), 68)
    with torch.device("meta"):  # only its config is read
        ref = timm.create_model("vit_small_patch16_224", pretrained=False)
    cfg = timm.data.resolve_data_config({"input_size": (3, 68, 68)}, model=ref)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), np.uint8))
    want = timm.data.create_transform(**cfg)(img)
    got = transform.eval_transform()(img)
    # 68 / 0.9 = 75.6: timm floors it
    assert transform.resize == 75 and transform.interpolation == "bicubic"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_file_saved_at_another_size_loads_as_timm_pretrained_would(tmp_path):
    """timm's checkpoint filter resamples the position embedding to the size built for."""
    ref = _reference_model("vit_small_patch14_reg4_dinov2", 70)  # a 5x5 grid
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    name = "timm:vit_small_patch14_reg4_dinov2"
    model = build_backbone(name, resolve_weights(name, str(path)), image_size=56)
    timm_loaded = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, img_size=56,
                                    pretrained_cfg_overlay={"file": str(path)}).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.inference_mode():
        torch.testing.assert_close(model.forward_features(x), timm_loaded.forward_features(x))


def test_wrong_weights_file_is_refused_in_one_line_with_an_example_key(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(_reference_model("resnet18", 64).state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit timm:convnext_atto: \d+ missing key"
                                           r"\(s\), e.g. \S+; \d+ unexpected key\(s\), e.g. "
                                           r"bn1\.bias\.$"):
        build_backbone("timm:convnext_atto", str(path))


def _fake_hf_cache(root, repo: str, fname: str, state: dict):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/REV/FILE}."""
    from safetensors.torch import save_file
    base = root / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0" * 40)
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / fname))
    return snap / fname


def test_imagenet_weights_come_from_the_local_hub_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "timm:convnext_atto"
    with pytest.raises(WeightsError) as err:
        resolve_weights(name, "imagenet")
    msg = str(err.value)
    assert "\n" not in msg
    assert "model.safetensors" in msg and "timm/convnext_atto.d2_in1k" in msg
    assert "--weights FILE" in msg and "--weights none" in msg
    ref = _reference_model("convnext_atto", 64, seed=5)
    file = _fake_hf_cache(tmp_path / "hub", "timm/convnext_atto.d2_in1k", "model.safetensors",
                          ref.state_dict())
    w = resolve_weights(name, "imagenet")
    assert w.kind == "imagenet" and w.path == str(file) and "d2_in1k" in w.source
    got = build_backbone(name, w).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.state_dict().items())


def test_cli_extract_writes_a_cache_h5py_reads_with_the_timm_config(tmp_path):
    digits_dir = write_digits(tmp_path / "digits", per_class=8)
    ref = _reference_model("vit_small_patch14_reg4_dinov2", 56, seed=3)
    path = tmp_path / "dino.pth"
    torch.save(ref.state_dict(), path)
    out = tmp_path / "cache"
    r = CliRunner().invoke(main, [
        "extract", "--model", "timm:vit_small_patch14_reg4_dinov2", "--weights", str(path),
        "--data", str(digits_dir), "--image-size", "56", "--pool", "1,2,4", "--precision",
        "fp32", "--workers", "0", "--no-progress", "--out", str(out)])
    assert r.exit_code == 0, r.output
    files = list(out.glob("*.h5"))
    assert [f.name for f in files] == ["digits_timm-vit_small_patch14_reg4_dinov2_file-"
                                       f"{w}_56.h5" for w in [files[0].name.split("file-")[1][:8]]]
    with h5py.File(files[0], "r") as f:
        cfg = json.loads(f.attrs["timm_data_config"])
        assert cfg["input_size"] == [3, 56, 56] and cfg["crop_pct"] == 1.0
        assert cfg["interpolation"] == "bicubic"
        assert f.attrs["model"] == "timm:vit_small_patch14_reg4_dinov2"
        assert f.attrs["timm_version"] == timm.__version__
        split = next(s for s in ("test", "val", "train") if s in f and len(f[s]["penultimate"]))
        g = f[split]
        assert g["penultimate"].shape[1] == 384 and g["pool4"].shape[1] == 384 * 16
        row = {k: g[k][0] for k in ("penultimate", "pool1", "pool2", "pool4")}
        first = g["paths"][0].decode() if isinstance(g["paths"][0], bytes) else g["paths"][0]
    info = CliRunner().invoke(main, ["info", str(files[0])])
    assert info.exit_code == 0 and "timm_data_config" in info.output
    # one image straight through timm's own transform and model
    # (a model built with img_size keeps its pretrained config's size: ask for 56 as featx does)
    cfg = timm.data.resolve_data_config({"input_size": (3, 56, 56)}, model=ref)
    tf = timm.data.create_transform(**cfg)
    img = Image.open(digits_dir / first).convert("RGB")
    want = _reference_features(ref, tf(img)[None], (1, 2, 4))
    for key, value in row.items():
        assert _rel(value, want[key][0]) < 1e-5, key


def test_cli_wrong_timm_name_is_one_line(digits_dir):
    r = CliRunner().invoke(main, ["extract", "--model", "timm:vit_smal_patch16_224",
                                  "--data", str(digits_dir)])
    assert r.exit_code != 0
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "timm:vit_small_patch16_224" in lines[0], r.output
    with pytest.raises(UnknownModelError):
        get_backbone("timm:no_such_model")
    with pytest.raises(UnknownModelError, match="augreg_in21k_ft_in1k"):
        get_backbone("timm:vit_small_patch16_224.bogus")
    assert get_backbone("timm:vit_small_patch16_224.augreg_in1k").pretrained_cfg["tag"] == \
        "augreg_in1k"


def test_cli_missing_imagenet_weights_offline_is_one_line(digits_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    r = CliRunner().invoke(main, ["extract", "--model", "timm:convnext_atto", "--data",
                                  str(digits_dir), "--out", str(tmp_path / "c"),
                                  "--no-progress"])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.startswith("Error")]
    assert len(lines) == 1 and "timm/convnext_atto.d2_in1k" in lines[0], r.output
    assert "Traceback" not in r.output and not list((tmp_path / "c").glob("*.h5"))


def test_models_lists_timm_names_with_all_and_filter():
    r = CliRunner().invoke(main, ["models"])
    assert r.exit_code == 0 and "resnet18" in r.output and "timm:NAME" in r.output
    assert "timm:vit_small_patch16_224" not in r.output
    r = CliRunner().invoke(main, ["models", "--filter", "vit_small_patch14*"])
    assert r.exit_code == 0
    assert "timm:vit_small_patch14_reg4_dinov2" in r.output and "resnet18" not in r.output
    r = CliRunner().invoke(main, ["models", "--all"])
    assert r.exit_code == 0 and "timm:convnext_atto" in r.output and "resnet18" in r.output


def test_finetune_lists_timm_stages_freezes_them_and_learns(tmp_path):
    from featx.config import FinetuneConfig
    from featx.data import load_dataset
    from featx.finetune import build_model, data_from_spec, finetune, list_stages
    name = "timm:vit_small_patch14_reg4_dinov2"
    r = CliRunner().invoke(main, ["finetune", "--model", name, "--list-stages"])
    stages = r.output.split()
    assert stages[:4] == ["none", "backbone", "stem", "blocks.0"] and "blocks.10" in stages
    model = build_model(name, "none", 3, freeze="blocks.5", image_size=56)
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert {"cls_token", "reg_token", "pos_embed", "patch_embed.proj.weight",
            "blocks.5.mlp.fc2.bias"} <= frozen
    assert not any(n.startswith(("blocks.6.", "blocks.11.", "norm.")) for n in frozen)
    assert model.backbone.num_classes == 0 and model.head.in_features == 384
    model.train()
    assert not model.backbone.blocks[5].training and model.backbone.blocks[6].training
    # the training run: timm's smallest ConvNeXt (the ViT above costs minutes per epoch here)
    cnn = "timm:convnext_atto"
    assert list_stages(cnn)[2:] == ["stem", "stages.0", "stages.1", "stages.2", "stages.3",
                                    "head"]
    root = write_digits(tmp_path / "digits", per_class=10)
    cfg = FinetuneConfig(model=cnn, weights="none", image_size=32, epochs=2, batch_size=10,
                         optimizer="adam", lr=1e-3, freeze="stages.1", workers=0,
                         augment=False, out_dir=tmp_path, progress=False)
    before = build_model(cnn, "none", 3, freeze="stages.1").state_dict()
    res = finetune(data_from_spec(load_dataset(root), workers=0), cfg)
    result = json.loads(res.result_path.read_text())
    assert result["kind"] == "finetune" and result["model"] == cnn
    assert res.run_dir.name.startswith("digits_timm-convnext_atto_finetune_none-stages.1-")
    after = torch.load(res.run_dir / "best.pt", map_location="cpu", weights_only=True)["model"]
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        assert moved == k.startswith(("backbone.stages.2.", "backbone.stages.3.",
                                      "backbone.head.", "head.")), k
    losses = [row["train_loss"] for row in res.history]
    assert losses[-1] < losses[0]
