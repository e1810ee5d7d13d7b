"""The frozen pass and the cache it writes, checked against independent computations."""
from __future__ import annotations

import errno
import hashlib

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import models
from torchvision.transforms._presets import ImageClassification

from featx.backbones import build_backbone
from featx.cache import SCHEMA_VERSION, Cache, CacheError, CacheWriter, StaleCacheError, partial_path
from featx.config import ExtractConfig
from featx.data import load_dataset
from featx.data.images import load_rgb
from featx.extract import extract
from tests.builders import CROSS_ATOL, CROSS_RTOL
from tests.builders import h5_datasets as _datasets

SIZE = 48


def _cfg(out, **kw):
    # fp32: the contracts are exact to 1e-5; auto may pick bf16 on CPUs that have it
    base = dict(model="resnet18", weights="none", pools=(1, 2, 4), image_size=SIZE,
                batch_size=16, workers=0, out_dir=out, progress=False, precision="fp32")
    base.update(kw)
    return ExtractConfig(**base)


def _reference_features(data, split, cfg):
    """torchvision's model + preset transform, run image by image, with a hook on layer4."""
    model = build_backbone(cfg.model, "none")  # same seeded weights
    transform = ImageClassification(crop_size=SIZE, resize_size=round(SIZE * 256 / 224))
    maps = []
    model.layer4.register_forward_hook(lambda m, i, o: maps.append(o))
    model.fc = nn.Identity()
    pens = []
    with torch.no_grad():
        for rel, _ in data.splits[split]:
            pens.append(model(transform(load_rgb(data.root / rel)).unsqueeze(0)))
    fmap = torch.cat(maps)
    pools = {f"pool{n}": nn.AdaptiveAvgPool2d(n)(fmap).flatten(1).numpy() for n in cfg.pools}
    return torch.cat(pens).numpy(), pools


def test_penultimate_and_pools_match_torchvision_on_real_images(digits_dir, tmp_path):
    data = load_dataset(digits_dir)
    cfg = _cfg(tmp_path / "c")
    res = extract(data, cfg)
    cache = Cache(res.path)
    assert res.status == "written" and res.n_images == 90
    pen_ref, pools_ref = _reference_features(data, "test", cfg)
    pen = cache.load("test", "penultimate")
    assert cache.paths("test") == [p for p, _ in data.splits["test"]]
    assert np.linalg.norm(pen - pen_ref) / np.linalg.norm(pen_ref) < 1e-5
    for name, ref in pools_ref.items():
        got = cache.load("test", name)
        assert got.shape == ref.shape
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5, name
    # ResNet: pool1 is the penultimate
    np.testing.assert_allclose(cache.load("train", "pool1"), cache.load("train", "penultimate"),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(cache.labels("test"), [lab for _, lab in data.splits["test"]])


def test_all_pool_sizes_come_from_one_forward_pass(digits_dir, tmp_path, monkeypatch):
    import featx.backbones.frozen as ex
    calls = []
    real_build = ex.build_backbone

    def counting_build(*a, **k):
        m = real_build(*a, **k)
        m.layer4.register_forward_hook(lambda *_: calls.append(1))
        return m

    monkeypatch.setattr(ex, "build_backbone", counting_build)
    data = load_dataset(digits_dir)
    extract(data, _cfg(tmp_path, pools=(1, 2, 4, 8), batch_size=90))
    n_batches = sum(-(-len(v) // 90) for v in data.splits.values())
    assert len(calls) == n_batches == 3


def test_vgg16_pools_come_from_features_and_penultimate_from_classifier(digits_dir, tmp_path):
    data = load_dataset(digits_dir, split=(0.8, 0.1, 0.1))
    path = extract(data, _cfg(tmp_path, model="vgg16", pools=(1, 2), image_size=32)).path
    cache = Cache(path)
    assert cache.shape("test", "penultimate")[1] == 4096
    assert cache.shape("test", "pool2")[1] == 512 * 4
    model = build_backbone("vgg16", "none")
    x = ImageClassification(crop_size=32, resize_size=round(32 * 256 / 224))(
        load_rgb(data.root / data.splits["test"][0][0])).unsqueeze(0)
    with torch.no_grad():
        fmap = model.features(x)
        model.classifier[6] = nn.Identity()
        pen = model(x)
    np.testing.assert_allclose(cache.load("test", "penultimate")[0], pen[0].numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(cache.load("test", "pool2")[0],
                               nn.AdaptiveAvgPool2d(2)(fmap).flatten(1)[0].numpy(), rtol=1e-4,
                               atol=1e-5)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()



def test_interrupted_run_resumes_to_the_same_file(digits_dir, tmp_path, monkeypatch):
    data = load_dataset(digits_dir)
    (digits_dir / "digit0" / "broken.png").write_text("not a png")  # a skipped row too
    data = load_dataset(digits_dir)
    whole = extract(data, _cfg(tmp_path / "whole", batch_size=8)).path

    real_append = CacheWriter.append
    seen = []

    def dying_append(self, *a, **k):
        real_append(self, *a, **k)
        seen.append(1)
        if len(seen) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "append", dying_append)
    cfg = _cfg(tmp_path / "cut", batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        extract(data, cfg)
    final = tmp_path / "cut" / whole.name
    assert not final.exists() and partial_path(final).exists()
    with pytest.raises(CacheError, match="unfinished"):
        Cache(partial_path(final))
    monkeypatch.setattr(CacheWriter, "append", real_append)
    res = extract(data, cfg)
    assert res.status == "resumed" and not partial_path(final).exists()
    a, b = _datasets(whole), _datasets(res.path)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert len(Cache(res.path).skipped()) == 1


def test_rerun_on_up_to_date_cache_does_nothing(digits_dir, tmp_path):
    data = load_dataset(digits_dir)
    path = extract(data, _cfg(tmp_path)).path
    before = _digest(path)
    assert extract(data, _cfg(tmp_path)).status == "up-to-date"
    assert _digest(path) == before


@pytest.mark.parametrize("change", ["images", "pools", "image_size_same_name", "split_fractions",
                                    "image_replaced_same_name", "random_weights_other_seed",
                                    "weights_file_replaced_same_name"])
def test_changed_inputs_are_refused_and_the_cache_is_untouched(digits_dir, tmp_path, change,
                                                               monkeypatch):
    weights = "none"
    if change == "weights_file_replaced_same_name":
        # resnet18's ImageNet file in the hub cache, then another file under the same name
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        hub = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        hub.parent.mkdir(parents=True)
        torch.manual_seed(1)
        torch.save(models.resnet18().state_dict(), hub)
        weights = "imagenet"
    data = load_dataset(digits_dir)
    path = extract(data, _cfg(tmp_path, weights=weights)).path
    before = _digest(path)
    cfg = _cfg(tmp_path, weights=weights)
    if change == "images":
        Image.new("L", (32, 32), 5).save(digits_dir / "digit1" / "new.png")
        data, expect = load_dataset(digits_dir), "dataset_fingerprint"
    elif change == "image_replaced_same_name":
        rel = data.splits["train"][0][0]
        size = (digits_dir / rel).stat().st_size
        Image.new("L", (40, 40), 9).save(digits_dir / rel)  # another image, same name
        assert (digits_dir / rel).stat().st_size != size
        data, expect = load_dataset(digits_dir), "dataset_fingerprint"
    elif change == "random_weights_other_seed":
        cfg, expect = _cfg(tmp_path, seed=1), "weights_sha256"  # the split's seed stays 0
    elif change == "weights_file_replaced_same_name":
        torch.manual_seed(2)
        torch.save(models.resnet18().state_dict(), hub)
        expect = "weights_sha256"
    elif change == "pools":
        cfg, expect = _cfg(tmp_path, pools=(1, 8)), "pools"
    elif change == "image_size_same_name":
        cfg, expect = _cfg(tmp_path, store="float16"), "store_dtype"
    else:
        # another split seed is another file (tests/test_config.py); other fractions are not
        data, expect = load_dataset(digits_dir, split=(0.6, 0.2, 0.2)), "split_fractions"
    with pytest.raises(StaleCacheError, match=f"{expect}.*--overwrite"):
        extract(data, cfg)
    assert _digest(path) == before
    cfg.overwrite = True
    assert extract(data, cfg).status == "written"
    assert _digest(path) != before


def test_failed_overwrite_leaves_the_old_cache_intact(digits_dir, tmp_path, monkeypatch):
    data = load_dataset(digits_dir)
    path = extract(data, _cfg(tmp_path)).path
    before = _digest(path)

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(CacheWriter, "append", full_disk)
    with pytest.raises(OSError):
        extract(data, _cfg(tmp_path, pools=(8,), overwrite=True))
    assert _digest(path) == before and Cache(path).attrs["pools"] == [1, 2, 4]


def test_bad_files_are_skipped_listed_and_odd_formats_converted(digits_dir, tmp_path):
    d0 = digits_dir / "digit0"
    (d0 / "text.png").write_text("this is text")
    good = (d0 / next(p.name for p in d0.iterdir())).read_bytes()
    (d0 / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(
        d0 / "sixteen.png")
    Image.new("RGBA", (32, 32), (200, 10, 10, 128)).save(d0 / "rgba.png")
    data = load_dataset(digits_dir, split=(1.0, 0.0, 0.0))
    res = extract(data, _cfg(tmp_path))
    skipped = {p.rsplit("/", 1)[-1]: r for _, p, r in res.skipped}
    assert set(skipped) == {"text.png", "truncated.png"}
    assert res.n_images == 92
    paths = Cache(res.path).paths("train")
    assert "digit0/sixteen.png" in paths and "digit0/rgba.png" in paths


def test_not_a_featx_cache_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not a featx cache"):
        Cache(tmp_path / "other.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CacheError, match="not an HDF5 file"):
        Cache(tmp_path / "text.h5")


def test_float16_store_and_memory_layout(digits_dir, tmp_path):
    data = load_dataset(digits_dir)
    path = extract(data, _cfg(tmp_path / "f16", store="float16", pools=(8,))).path
    ref = Cache(extract(data, _cfg(tmp_path / "f32", pools=(8,))).path).load("train", "pool8")
    with h5py.File(path, "r") as f:
        ds = f["train/pool8"]
        assert ds.dtype == np.float16 and ds.shape == (len(data.splits["train"]), 512 * 64)
        # whole rows per chunk, ~1 MiB each: 16 rows of 32768 float16
        assert ds.chunks == (16, 512 * 64)
        assert f.attrs["complete"] and f.attrs["featx_schema"] == SCHEMA_VERSION
        np.testing.assert_array_equal(ds[:], ref.astype(np.float16))


def test_real_imagenet_weights_give_transfer_features(mobilenet_in_hub, digits_dir, tmp_path):
    """mobilenet_v2 ImageNet features of digits separate the classes (nearest centroid)."""
    data = load_dataset(digits_dir)
    path = extract(data, _cfg(tmp_path, model="mobilenet_v2", weights="imagenet",
                              image_size=64, pools=())).path
    cache = Cache(path)
    assert cache.attrs["weights_kind"] == "imagenet"
    assert "IMAGENET1K_V1" in cache.attrs["weights_source"]
    assert cache.attrs["transform"]["resize"] == round(64 * 256 / 224)  # V1's own transform
    xtr, ytr = cache.load("train", "penultimate"), cache.labels("train")
    xte, yte = cache.load("test", "penultimate"), cache.labels("test")
    centroids = np.stack([xtr[ytr == c].mean(0) for c in range(3)])
    pred = np.argmin(((xte[:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == yte).mean() > 0.8


def test_torchvision_reference_for_real_weights(mobilenet_in_hub, digits_dir, tmp_path):
    data = load_dataset(digits_dir, split=(0.8, 0.1, 0.1))
    cache = Cache(extract(data, _cfg(tmp_path, model="mobilenet_v2", weights="imagenet",
                                     image_size=64, pools=(1,))).path)
    w = models.MobileNet_V2_Weights.IMAGENET1K_V1
    ref = models.mobilenet_v2(weights=w).eval()
    ref.classifier[1] = nn.Identity()
    tf = w.transforms(crop_size=64, resize_size=round(64 * 256 / 224))
    rel = data.splits["test"][0][0]
    with torch.no_grad():
        want = ref(tf(load_rgb(data.root / rel)).unsqueeze(0))[0].numpy()
    got = cache.load("test", "penultimate")[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


def test_rows_written_after_the_last_commit_are_dropped_on_resume(digits_dir, tmp_path,
                                                                    monkeypatch):
    """A kill between writing a batch and committing it: the resumed file is still exact."""
    data = load_dataset(digits_dir)
    whole = extract(data, _cfg(tmp_path / "whole", batch_size=8)).path
    real_append = CacheWriter.append

    def half_append(self, split, next_index, features, labels, paths, skipped):
        if next_index > 24:  # write the rows of the 4th batch but die before the commit
            g = self.f[split]
            n = g["penultimate"].shape[0]
            for name, arr in features.items():
                g[name].resize(n + len(arr), axis=0)
                g[name][n:] = 123.0
            raise KeyboardInterrupt
        real_append(self, split, next_index, features, labels, paths, skipped)

    monkeypatch.setattr(CacheWriter, "append", half_append)
    cfg = _cfg(tmp_path / "cut", batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        extract(data, cfg)
    monkeypatch.setattr(CacheWriter, "append", real_append)
    res = extract(data, cfg)
    a, b = _datasets(whole), _datasets(res.path)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_killed_process_resumes_to_the_same_file(tmp_path):
    """SIGKILL a real `featx extract` mid-run, run it again, compare with an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.builders import write_digits
    root = write_digits(tmp_path / "d", per_class=100, size=32)
    args = [sys.executable, "-m", "featx.cli", "extract", "--model", "resnet18", "--data",
            str(root), "--weights", "none", "--pool", "1,2", "--image-size", "64",
            "--batch-size", "4", "--workers", "0", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(args + ["--out", str(tmp_path / "whole")], check=True, env=env,
                   capture_output=True)
    out = tmp_path / "cut"
    proc = subprocess.Popen(args + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    partial = out / "d_resnet18_none_64.h5.partial"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            with h5py.File(partial, "r", locking=False) as f:
                if f["train"].attrs["next_index"] >= 40:
                    break
        except (OSError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "d_resnet18_none_64.h5").exists()
    r = subprocess.run(args + ["--out", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = _datasets(tmp_path / "whole" / "d_resnet18_none_64.h5")
    b = _datasets(out / "d_resnet18_none_64.h5")
    for k in a:  # three processes wrote these rows: floats to CROSS_RTOL, the rest exactly
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(b[k], a[k], rtol=CROSS_RTOL, atol=CROSS_ATOL, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_compiled_extraction_gives_the_same_features(digits_dir, tmp_path):
    """--compile (inductor, frozen weights, last batch padded) changes speed, not features."""
    from click.testing import CliRunner

    from featx.cli import main
    eager = extract(load_dataset(digits_dir), _cfg(tmp_path / "eager"))
    r = CliRunner().invoke(main, ["extract", "--model", "resnet18", "--weights", "none",
                                  "--data", str(digits_dir), "--pool", "1,2,4",
                                  "--image-size", str(SIZE), "--batch-size", "16",
                                  "--workers", "0", "--no-progress", "--compile",
                                  "--precision", "fp32",
                                  "--out", str(tmp_path / "compiled")])
    assert r.exit_code == 0, r.output
    assert "torch.compile failed" not in r.output  # compiled for real, no eager fallback
    compiled = Cache(next((tmp_path / "compiled").glob("*.h5")))
    # 90 images in batches of 16: the last batch of test is short and must come back unpadded
    for split in ("train", "val", "test"):
        for name in ("penultimate", "pool2", "pool4"):
            ref = Cache(eager.path).load(split, name)
            got = compiled.load(split, name)
            assert got.shape == ref.shape
            assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4, (split, name)


def test_bf16_features_are_close_to_fp32_and_recorded(digits_dir, tmp_path):
    data = load_dataset(digits_dir)
    f32 = Cache(extract(data, _cfg(tmp_path / "f32")).path)
    b16 = Cache(extract(data, _cfg(tmp_path / "b16", precision="bf16")).path)
    assert f32.attrs["precision"] == "fp32" and b16.attrs["precision"] == "bf16"
    for name in ("penultimate", "pool2"):
        a, b = f32.load("test", name), b16.load("test", name)
        rel = np.linalg.norm(b - a) / np.linalg.norm(a)
        assert 0 < rel < 3e-2, (name, rel)  # bf16 keeps 8 bits of mantissa: ~1e-3 to 1e-2
    # the same command with the other precision is another cache, refused without --overwrite
    with pytest.raises(StaleCacheError, match="precision"):
        extract(data, _cfg(tmp_path / "f32", precision="bf16"))


def test_a_failing_compile_falls_back_to_eager_and_says_so(digits_dir, tmp_path, monkeypatch):
    """No C++ compiler, an unsupported op...: --compile must not cost the run."""
    data = load_dataset(digits_dir)

    def broken_compile(model, **kw):
        def run(x):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    res = extract(data, _cfg(tmp_path / "c", compile=True))
    assert res.status == "written" and res.n_images == 90
    compile_notes = [n for n in res.notes if "torch.compile" in n]  # pool 4 > the 2x2 map
    assert len(compile_notes) == 1 and "torch.compile failed" in compile_notes[0]
    assert "C++ compiler" in compile_notes[0] and "--no-compile" in compile_notes[0]
    eager = extract(data, _cfg(tmp_path / "e"))
    np.testing.assert_array_equal(Cache(res.path).load("test", "pool2"),
                                  Cache(eager.path).load("test", "pool2"))


def test_a_cache_with_more_pool_sizes_serves_a_request_for_fewer(digits_dir, tmp_path):
    data = load_dataset(digits_dir)
    path = extract(data, _cfg(tmp_path, pools=(1, 2, 4))).path
    before = _digest(path)
    res = extract(data, _cfg(tmp_path, pools=(2,)))
    assert res.status == "up-to-date" and res.path == path and _digest(path) == before
    assert extract(data, _cfg(tmp_path, pools=())).status == "up-to-date"
    # a pool size the file lacks, or any other input, still needs a new extraction
    with pytest.raises(StaleCacheError, match="pools"):
        extract(data, _cfg(tmp_path, pools=(2, 8)))
    with pytest.raises(StaleCacheError, match="store_dtype"):
        extract(data, _cfg(tmp_path, pools=(2,), store="float16"))
    assert _digest(path) == before
