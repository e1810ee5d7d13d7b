"""The registry's contracts: penultimate = torchvision's input to its final Linear, weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision import models

from featx.backbones import (
    FeatureModel,
    UnknownModelError,
    WeightsError,
    build_backbone,
    get_backbone,
    import_weights,
    list_backbones,
    prepare_for_inference,
    resolve_weights,
)

ALL = list_backbones()


def _torchvision_pre_logits(model: nn.Module, classifier: str, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own forward with the final Linear replaced by Identity."""
    m = copy.deepcopy(model)
    parent, _, leaf = classifier.rpartition(".")
    setattr(m.get_submodule(parent) if parent else m, leaf, nn.Identity())
    return m(x)


@pytest.mark.parametrize("name", ALL)
def test_penultimate_is_the_input_of_the_final_linear(name):
    spec = get_backbone(name)
    model = build_backbone(name, "none")
    assert isinstance(model.get_submodule(spec.classifier), nn.Linear)
    assert model.get_submodule(spec.classifier).in_features == spec.penultimate_dim
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fmap, pen = FeatureModel(spec, model)(x)
        ref = _torchvision_pre_logits(model, spec.classifier, x)
    assert fmap.shape[1] == spec.spatial_channels
    assert pen.shape == (2, spec.penultimate_dim)
    rel = (pen - ref).norm() / ref.norm().clamp_min(1e-12)
    assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", ALL)
def test_the_fast_form_extraction_runs_keeps_the_contract(name):
    """BatchNorm folded into the convs and channels-last: same features as torchvision's."""
    spec = get_backbone(name)
    model = build_backbone(name, "none")
    g = torch.Generator().manual_seed(2)
    for m in model.modules():  # non-trivial statistics, so folding has something to get wrong
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    x = torch.randn(2, 3, 64, 64, generator=g)
    with torch.inference_mode():
        ref = _torchvision_pre_logits(model, spec.classifier, x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    fast = prepare_for_inference(FeatureModel(spec, model).eval())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    if n_bn:  # densenet's pre-activation BNs (BN before conv) cannot fold: about half stay
        assert left <= 0.55 * n_bn, f"{name}: only {n_bn - left} of {n_bn} BatchNorms folded"
    assert not any(p.requires_grad for p in fast.parameters())
    with torch.inference_mode():
        _, pen = fast(x.contiguous(memory_format=torch.channels_last))
    rel = (pen - ref).norm() / ref.norm().clamp_min(1e-12)
    assert rel < 1e-5, f"{name}: relative error {rel:.2e}"


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "shufflenet_v2_x1_0", "googlenet",
                                  "mobilenet_v2", "efficientnet_b0"])
def test_global_average_of_spatial_map_is_penultimate_where_the_model_pools_directly(name):
    spec = get_backbone(name)
    fm = FeatureModel(spec, build_backbone(name, "none"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        fmap, pen = fm(x)
    torch.testing.assert_close(nn.AdaptiveAvgPool2d(1)(fmap).flatten(1), pen, rtol=1e-5,
                               atol=1e-6)


def test_random_weights_are_seeded():
    a = build_backbone("resnet18", resolve_weights("resnet18", "none", seed=3))
    b = build_backbone("resnet18", resolve_weights("resnet18", "none", seed=3))
    c = build_backbone("resnet18", resolve_weights("resnet18", "none", seed=4))
    assert torch.equal(a.conv1.weight, b.conv1.weight)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="resnet18") as err:
        get_backbone("resnet81")
    assert "featx models" in str(err.value)


def test_missing_imagenet_weights_offline_names_the_file_and_alternatives():
    with pytest.raises(WeightsError) as err:
        resolve_weights("resnet18", "imagenet")
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and "--weights none" in msg and "\n" not in msg


def test_imagenet_weights_from_hub_cache_match_torchvision(mobilenet_in_hub):
    w = resolve_weights("mobilenet_v2", "imagenet")
    assert w.kind == "imagenet" and w.version.endswith("IMAGENET1K_V1")
    ours = build_backbone("mobilenet_v2", w)
    # torchvision itself, loading the same file from the same hub cache, offline
    ref = models.mobilenet_v2(weights=models.MobileNet_V2_Weights.IMAGENET1K_V1).eval()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_weights_file_with_wrong_shapes_is_refused_with_an_example_key(tmp_path):
    bad = tmp_path / "r18.pth"
    torch.save(models.resnet34().state_dict(), bad)
    with pytest.raises(WeightsError, match=r"does not fit resnet18: .*layer"):
        build_backbone("resnet18", str(bad))
    not_a_state = tmp_path / "junk.pth"
    not_a_state.write_text("hello")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        build_backbone("resnet18", str(not_a_state))


def test_weights_file_round_trip_and_import(tmp_path, _offline_torch_home):
    src = tmp_path / "mine.pth"
    m = build_backbone("resnet18", "none")
    torch.save(m.state_dict(), src)
    w = resolve_weights("resnet18", str(src))
    assert w.kind == "file" and len(w.sha256) == 64
    loaded = build_backbone("resnet18", w)
    assert torch.equal(loaded.fc.weight, m.fc.weight)
    target = import_weights(src, "resnet18")
    assert target.name == "resnet18-f37072fd.pth" and target.is_file()
    assert resolve_weights("resnet18", "imagenet").kind == "imagenet"
    target.unlink()


def test_stages_exist_in_the_model():
    for name in ALL:
        spec = get_backbone(name)
        model = build_backbone(name, "none") if name in ("resnet18", "vgg16", "googlenet") \
            else spec.builder(weights=None, **spec.build_kwargs)
        for stage in spec.stages:
            model.get_submodule(stage)


# --- bf16 and the features: the registry's per-model rule for --precision auto -------------

def test_auto_precision_picks_bf16_only_for_models_whose_recorded_error_is_within_the_bound(
        monkeypatch):
    import featx.runtime as rt
    from featx.backbones import BF16_MAX_ERROR, list_backbones, resolve_run
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: True)  # where auto would pick bf16
    for name in list_backbones():
        error = get_backbone(name).bf16_error
        got = resolve_run(name, "none", device="cpu", precision="auto").precision
        if error is None or error > BF16_MAX_ERROR:
            assert got == "fp32", (name, error)
        else:
            assert got == "bf16", (name, error)
    assert resolve_run("mobilenet_v2", "none", device="cpu", precision="auto").precision == \
        "fp32"
    # asked for by name, bf16 is still bf16; fine-tuning (not frozen features) keeps bf16
    assert resolve_run("mobilenet_v2", "none", device="cpu", precision="bf16").precision == \
        "bf16"
    assert resolve_run("mobilenet_v2", "none", device="cpu", frozen=False).precision == "bf16"


def test_mobilenet_v2_with_imagenet_weights_moves_beyond_the_bound_in_bf16(mobilenet_in_hub,
                                                                         tmp_path):
    """The registry's mobilenet_v2 entry is honest: measured again here with the real
    weights on 12 digit images at 64 px, bf16 moves its features beyond the bound.

    The recorded 2.2e-1 is at 224 px on X-rays; this smaller set measured 5.7e-2. The test
    asks only for more than 2x the bound, so another CPU's bf16 kernels (AMX vs
    AVX512-BF16 vs emulated, which round the same bf16 inputs but sum in another order)
    cannot flip the verdict."""
    import numpy as np
    import torch

    from featx.backbones import BF16_MAX_ERROR, frozen_model, resolve_run
    from featx.data import load_dataset
    from featx.data.images import ImageFiles
    from tests.builders import write_digits

    assert get_backbone("mobilenet_v2").bf16_error > BF16_MAX_ERROR
    data = load_dataset(write_digits(tmp_path / "d", per_class=4))
    items = [it for split in data.splits.values() for it in split]
    feats = {}
    for precision in ("fp32", "bf16"):
        ready = resolve_run("mobilenet_v2", "imagenet", device="cpu", precision=precision,
                            image_size=64)
        ds = ImageFiles(data.root, items, ready.transform.eval_transform_uint8(),
                        ready.transform.crop, dtype=torch.uint8)
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        feats[precision] = frozen_model("mobilenet_v2", ready).features(x, (1,))["penultimate"]
    error = np.linalg.norm(feats["bf16"] - feats["fp32"]) / np.linalg.norm(feats["fp32"])
    assert error > 2 * BF16_MAX_ERROR, error
