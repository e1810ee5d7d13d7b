"""Intermediate layers (featx/backbones/layers.py): every layer x pool in the cache equals
the reference library's own intermediate output, all from one forward; identical features
stored once; the schema-1 cache read as it is; bad layer names refused in one line.

References are computed here independently of featx's forward: torchvision's
``create_feature_extractor`` on a freshly built torchvision model (no BatchNorm folding, no
channels-last), and timm's ``forward_intermediates`` on a freshly built timm model.
"""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor

import featx.extract.single as single
from featx.backbones import build_backbone, get_backbone, layer_plan, list_layers
from featx.cache import Cache, CacheError, StaleCacheError
from featx.config import ExtractConfig
from featx.data import load_dataset
from featx.data.images import ImageFiles
from featx.errors import ParameterError
from featx.extract import extract
from tests.builders import write_digits

POOLS = (1, 2)


def _relerr(a, b) -> float:
    """max |a - b| over max |b|. BatchNorm folding and channels-last reorder float sums:
    features move by ~1e-7 to 4e-6 relative (frozen.py), so the contract is 1e-5."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    # 3 classes x 4 images: 6 train rows (two batches at batch 4), 3 val, 3 test
    return write_digits(tmp_path_factory.mktemp("layers") / "d", per_class=4)


def _extract(data_dir, out, model, layers, size, *, pools=POOLS, batch_size=4, **kw):
    cfg = ExtractConfig(model=model, weights="none", pools=pools, layers=layers,
                        image_size=size, device="cpu", precision="fp32", out_dir=out,
                        progress=False, workers=0, batch_size=batch_size, **kw)
    return extract(load_dataset(data_dir), cfg)


def _images(cache: Cache, split: str, model: str, size: int) -> torch.Tensor:
    """The split's images as the cache saw them, normalised: (n, 3, size, size)."""
    from featx.backbones import backbone_transform, resolve_weights
    t = backbone_transform(model, resolve_weights(model, "none"), size)
    ds = ImageFiles(cache.attrs["dataset_root"], cache.split_items(split),
                    t.eval_transform_uint8(), t.crop, dtype=torch.uint8)
    return t.normalize_batch(torch.stack([ds[i][0] for i in range(len(ds))]))


def _count_forwards(monkeypatch, stem: str) -> list[int]:
    """A forward pre-hook on the model's stem, counting its calls in every batch."""
    calls = [0]
    real = single.frozen_model

    def counting(*args, **kw):
        frozen = real(*args, **kw)
        frozen.network.model.get_submodule(stem).register_forward_pre_hook(
            lambda *_: calls.__setitem__(0, calls[0] + 1))
        return frozen
    monkeypatch.setattr(single, "frozen_model", counting)
    return calls


def _batches(cache: Cache, batch_size: int = 4) -> int:
    return sum(-(-len(cache.labels(s)) // batch_size) for s in cache.splits)


# (model, image size, stem module): sizes at which every stage's map is at least 1x1
TORCHVISION = [("resnet18", 64, "conv1"), ("vgg16", 64, "features.0"),
               ("densenet121", 64, "features.conv0"), ("mobilenet_v2", 64, "features.0.0")]


@pytest.mark.parametrize("model,size,stem", TORCHVISION)
def test_every_stage_equals_torchvisions_feature_extractor_from_one_forward(
        model, size, stem, tiny_data, tmp_path, monkeypatch):
    calls = _count_forwards(monkeypatch, stem)
    res = _extract(tiny_data, tmp_path, model, ("stages",), size)
    cache = Cache(res.path)
    # one forward per batch for all layers and pools
    assert calls[0] == _batches(cache)
    spec = get_backbone(model)
    ref = build_backbone(model, "none", seed=0)  # the same seeded init, as torchvision builds it
    nodes = {layer: layer for layer in spec.layer_stages}
    extractor = create_feature_extractor(ref, return_nodes=nodes).eval()
    for split in ("train", "test"):
        with torch.no_grad():
            maps = extractor(_images(cache, split, model, size))
        for layer in spec.layer_stages:
            for n in POOLS:
                want = F.adaptive_avg_pool2d(maps[layer], n).flatten(1).numpy()
                got = cache.load(split, f"{layer}.pool{n}")
                assert got.shape == want.shape, (layer, n)
                assert _relerr(got, want) < 1e-5, f"{model} {split} {layer}.pool{n}"
    # stored once: the last map's pools are not stored again under the last stage's name
    names = cache.features
    assert len(names) == len(set(names))
    if spec.map_layer is not None:
        assert f"{spec.map_layer}.pool2" not in names and "pool2" in names
        np.testing.assert_array_equal(cache.load("test", f"{spec.map_layer}.pool2"),
                                      cache.load("test", "pool2"))
    if spec.penultimate_alias == "pool1":  # a global-average-pool head
        assert "pool1" not in names and cache.aliases["pool1"] == "penultimate"
        np.testing.assert_array_equal(cache.load("test", "pool1"),
                                      cache.load("test", "penultimate"))
    else:
        assert "pool1" in names


def test_any_module_name_is_a_layer_and_a_shared_module_is_refused(tiny_data, tmp_path):
    res = _extract(tiny_data, tmp_path, "resnet18", ("layer2.1.conv1", "layer3"), 64,
                   pools=(2,))
    cache = Cache(res.path)
    ref = build_backbone("resnet18", "none", seed=0)
    ext = create_feature_extractor(ref, {"layer2.1.conv1": "a", "layer3": "b"}).eval()
    with torch.no_grad():
        maps = ext(_images(cache, "test", "resnet18", 64))
    for key, name in (("a", "layer2.1.conv1.pool2"), ("b", "layer3.pool2")):
        want = F.adaptive_avg_pool2d(maps[key], 2).flatten(1).numpy()
        assert _relerr(cache.load("test", name), want) < 1e-5, name
    names = {n for n, _, _ in list_layers("resnet18")}
    assert {"layer3", "layer2.1.conv1"} <= names and "layer1.0.relu" not in names
    with pytest.raises(ParameterError, match=r"layers='layer1\.0\.relu': runs 2 times per "
                                             r"forward"):
        layer_plan("resnet18", ("layer1.0.relu",))
    with pytest.raises(ParameterError, match=r"layers='layer9': is no module of it \(resnet18\);"
                                             r" `featx models --layers resnet18` lists"):
        layer_plan("resnet18", ("layer9",))
    with pytest.raises(ParameterError, match="last4': is for ViT-style models"):
        layer_plan("resnet18", ("last4",))


# --- timm ---------------------------------------------------------------------------------

def _timm_reference(model: str, size: int):
    return build_backbone(model, "none", seed=0, image_size=size)


@pytest.mark.parametrize("model,size,stem", [("timm:convnext_atto", 64, "stem"),
                                             ("timm:vit_tiny_patch16_224", 64, "patch_embed")])
def test_timm_layers_equal_forward_intermediates_from_one_forward(model, size, stem, tiny_data,
                                                                   tmp_path, monkeypatch):
    pytest.importorskip("timm")
    spec = get_backbone(model)
    tokens = spec.layout == "tokens"
    layers = ("stages", "last4") if tokens else ("stages",)
    calls = _count_forwards(monkeypatch, stem)
    res = _extract(tiny_data, tmp_path, model, layers, size)
    cache = Cache(res.path)
    assert calls[0] == _batches(cache)
    ref = _timm_reference(model, size)
    kw = {"return_prefix_tokens": True} if tokens else {}
    for split in ("train", "test"):
        x = _images(cache, split, model, size)
        with torch.no_grad():
            final, inter = ref.forward_intermediates(x, norm=True, output_fmt="NCHW", **kw)
            pen = ref.forward_head(final, pre_logits=True)
        assert _relerr(cache.load(split, "penultimate"), pen.numpy()) < 1e-5
        for i, layer in enumerate(spec.layer_stages):
            fmap, prefix = inter[i] if tokens else (inter[i], None)
            for n in POOLS:
                want = F.adaptive_avg_pool2d(fmap, n).flatten(1).numpy()
                assert _relerr(cache.load(split, f"{layer}.pool{n}"), want) < 1e-5, layer
            if tokens:  # the class token and, pool1, the mean patch token
                assert _relerr(cache.load(split, f"{layer}.cls"), prefix[:, 0].numpy()) < 1e-5
                mean_patch = fmap.mean((2, 3)).numpy()
                assert _relerr(cache.load(split, f"{layer}.pool1"), mean_patch) < 1e-5
        if tokens:  # DINOv2's linear eval: 4 class tokens and the last block's mean patch
            want = torch.cat([inter[i][1][:, 0] for i in range(-4, 0)]
                             + [inter[-1][0].mean((2, 3))], 1).numpy()
            assert _relerr(cache.load(split, "last4"), want) < 1e-5
    last = spec.layer_stages[-1]
    assert f"{last}.pool2" not in cache.features  # the last map's pool2, stored once
    if tokens:  # a class-token head: the last block's class token is the penultimate
        assert cache.aliases[f"{last}.cls"] == "penultimate"


# --- the cache ----------------------------------------------------------------------------

def test_a_schema_1_cache_is_read_unchanged_and_a_newer_one_refused_in_one_line(
        tiny_data, tmp_path, cli):
    res = _extract(tiny_data, tmp_path, "resnet18", (), 32, pools=(1,))
    with h5py.File(res.path, "r+") as f:  # what featx wrote before layers: schema 1
        f.attrs["featx_schema"] = 1
        for key in ("layers", "feature_aliases", "layer_maps"):
            del f.attrs[key]
        f.attrs["features"] = '["penultimate", "pool1"]'
        for split in ("train", "val", "test"):
            f[f"{split}/pool1"] = f[f"{split}/penultimate"][:]
    cache = Cache(res.path)
    assert cache.features == ["penultimate", "pool1"] and cache.aliases == {}
    assert cache.load("test", "pool1").shape == (3, 512)
    # the same request finds it up to date; one asking for layers names what differs
    assert _extract(tiny_data, tmp_path, "resnet18", (), 32, pools=(1,)).status == "up-to-date"
    with pytest.raises(StaleCacheError, match=r"layers: cache has \[\], requested \['layer1', "):
        _extract(tiny_data, tmp_path, "resnet18", ("stages",), 32, pools=(1,))
    with h5py.File(res.path, "r+") as f:
        f.attrs["featx_schema"] = 3
    with pytest.raises(CacheError, match=r"cache schema 3, this featx reads schema 1 and 2 "
                                         r"\(writes 2\); extract again with --overwrite\.$"):
        Cache(res.path)
    out = cli("info", res.path)
    assert out.exit_code == 1 and "cache schema 3" in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_info_states_each_layers_size_and_the_aliases(tiny_data, tmp_path, cli):
    res = _extract(tiny_data, tmp_path, "resnet18", ("layer3",), 32, pools=(1,))
    out = cli("info", res.path)
    assert out.exit_code == 0, out.output
    assert "layer3.pool1: shape (6, 256), float32," in out.output and " MB" in out.output
    assert "pool1: = penultimate (identical, stored once)" in out.output


def test_cli_lists_layers_and_refuses_a_bad_one_before_reading_data(cli, tmp_path):
    out = cli("models", "--layers", "resnet18")
    assert out.exit_code == 0, out.output
    assert "* layer3" in out.output and "  layer3.0.conv1" in out.output
    out = cli("extract", "--model", "resnet18", "--data", tmp_path,  # holds no images
              "--layers", "layer3,nope")
    assert out.exit_code != 0
    assert "--layers 'nope': is no module of it (resnet18)" in out.output
    assert "Traceback" not in out.output


# --- kept maps, pooled later ------------------------------------------------------------------

def test_pool_sizes_added_from_kept_maps_equal_extracting_them(tiny_data, tmp_path, cli):
    from featx.extract import repool
    kept = _extract(tiny_data, tmp_path / "kept", "resnet18", ("layer2",), 64, pools=(1,),
                    keep_map=True, map_store="float32").path
    with h5py.File(kept, "r") as f:
        assert f["train/layer2.map"].shape == (6, 128 * 8 * 8)
    out = cli("pool", kept, "--pool", "3,5")
    assert out.exit_code == 0, out.output
    assert "added layer2.pool3, layer2.pool5, pool3, pool5" in out.output
    direct = Cache(_extract(tiny_data, tmp_path / "direct", "resnet18", ("layer2",), 64,
                            pools=(1, 3, 5)).path)
    pooled = Cache(kept)
    assert set(direct.features) <= set(pooled.features)
    for split in ("train", "test"):
        for name in direct.features:
            # the same fp32 AdaptiveAvgPool2d of the same fp32 map, only in other batches
            np.testing.assert_allclose(pooled.load(split, name), direct.load(split, name),
                                       rtol=1e-6, atol=1e-7, err_msg=name)
    assert repool(kept, (3,)) == []  # nothing new: the file is left as it is
    # the default fp16 map: equal to fp16 rounding of the map (2^-11 relative)
    half = _extract(tiny_data, tmp_path / "half", "resnet18", ("layer2",), 64, pools=(1,),
                    keep_map=True).path
    with h5py.File(half, "r") as f:
        assert f["train/map"].dtype == np.float16 and f["train/penultimate"].dtype == np.float32
    repool(half, (3,))
    assert _relerr(Cache(half).load("test", "layer2.pool3"),
                   direct.load("test", "layer2.pool3")) < 2e-3
    # a cache without maps: one line
    out = cli("pool", direct.path, "--pool", "3")
    assert out.exit_code == 1 and "kept no spatial map; extract it with --keep-map" in out.output
    assert len(out.output.strip().splitlines()) == 1
