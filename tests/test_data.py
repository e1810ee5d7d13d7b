"""The three layouts, the seeded stratified split, and image conversion."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featx.data import DataError, load_dataset, load_rgb, parse_split_fractions


def test_class_folders_are_split_stratified_and_deterministically(digits_dir):
    a = load_dataset(digits_dir, split=(0.6, 0.2, 0.2), seed=0)
    b = load_dataset(digits_dir, split=(0.6, 0.2, 0.2), seed=0)
    c = load_dataset(digits_dir, split=(0.6, 0.2, 0.2), seed=1)
    assert a.layout == "folders" and a.classes == ["digit0", "digit1", "digit2"]
    assert a.splits == b.splits and a.fingerprint() == b.fingerprint()
    assert a.splits["test"] != c.splits["test"]
    assert a.counts() == {"train": [18, 18, 18], "val": [6, 6, 6], "test": [6, 6, 6]}
    files = [p for s in a.splits.values() for p, _ in s]
    assert len(files) == len(set(files)) == 90  # disjoint and complete


def test_pre_split_folders_are_taken_as_they_are(digits_split_dir):
    spec = load_dataset(digits_split_dir)
    assert spec.layout == "folders-split"
    for split, items in spec.splits.items():
        for rel, label in items:
            assert rel.startswith(f"{split}/digit{label}/")
    assert set(spec.splits) == {"train", "val", "test"}


def test_pre_split_without_val_or_test(digits_split_dir):
    import shutil
    shutil.rmtree(digits_split_dir / "val")
    shutil.rmtree(digits_split_dir / "test")
    assert set(load_dataset(digits_split_dir).splits) == {"train"}


def test_csv_manifest_with_and_without_split_column(digits_dir):
    files = sorted(digits_dir.rglob("*.png"))
    rows = ["path,label,split"] + [
        f"{p.relative_to(digits_dir).as_posix()},{p.parent.name},{'train' if i % 3 else 'test'}"
        for i, p in enumerate(files)]
    (digits_dir / "m.csv").write_text("\n".join(rows) + "\n")
    spec = load_dataset(digits_dir / "m.csv")
    assert spec.layout == "csv" and set(spec.splits) == {"train", "test"}
    assert len(spec.splits["test"]) == 30
    (digits_dir / "n.csv").write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    spec2 = load_dataset(digits_dir / "n.csv", split=(0.6, 0.2, 0.2), seed=0)
    folder = load_dataset(digits_dir, split=(0.6, 0.2, 0.2), seed=0)
    assert spec2.splits == folder.splits  # same deterministic rule as class folders


def test_csv_with_bad_split_value_or_header(tmp_path):
    (tmp_path / "a.csv").write_text("path,label,split\nx.png,a,training\n")
    with pytest.raises(DataError, match="unknown split value.*'training'"):
        load_dataset(tmp_path / "a.csv")
    (tmp_path / "b.csv").write_text("file,class\nx.png,a\n")
    with pytest.raises(DataError, match="path,label"):
        load_dataset(tmp_path / "b.csv")


def test_empty_class_folder_is_left_out_with_a_note(digits_dir):
    (digits_dir / "empty").mkdir()
    spec = load_dataset(digits_dir)
    assert "empty" not in spec.classes
    assert any("empty" in n for n in spec.notes)


def test_class_too_small_for_the_split_says_what_to_change(digits_dir):
    (digits_dir / "tiny").mkdir()
    Image.new("L", (8, 8)).save(digits_dir / "tiny" / "one.png")
    with pytest.raises(DataError, match=r"class 'tiny' has 1 image.*needs at least 3"):
        load_dataset(digits_dir)
    assert "tiny" in load_dataset(digits_dir, split=(1.0, 0.0, 0.0)).classes


def test_single_class_train_split_is_refused(tmp_path):
    for i in range(5):
        (tmp_path / "only").mkdir(exist_ok=True)
        Image.new("L", (8, 8), i).save(tmp_path / "only" / f"{i}.png")
    with pytest.raises(DataError, match="single class"):
        load_dataset(tmp_path)


def test_bad_split_fractions_and_missing_path(tmp_path):
    with pytest.raises(DataError, match="sum to 1"):
        parse_split_fractions("0.5,0.2")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "nope")


def test_sixteen_bit_grayscale_is_scaled_to_eight_bit_rgb(tmp_path):
    arr = np.array([[0, 257 * 100], [65535, 257 * 10]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = load_rgb(tmp_path / "a.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[..., 0], [[0, 100], [255, 10]])


def test_rgba_palette_and_grayscale_become_rgb(tmp_path):
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.new("L", (4, 4), 77).save(tmp_path / "gray.jpg")
    Image.new("P", (4, 4), 3).save(tmp_path / "pal.gif")
    assert np.asarray(load_rgb(tmp_path / "rgba.png"))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(load_rgb(tmp_path / "gray.jpg")).shape == (4, 4, 3)
    assert load_rgb(tmp_path / "pal.gif").mode == "RGB"


def test_corrupt_and_fake_files_raise_oserror(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    for name in ("text.png", "trunc.png"):
        with pytest.raises(OSError):
            load_rgb(tmp_path / name)


def test_batch_normalisation_gives_the_per_image_transform_bit_for_bit(digits_dir):
    """Extraction's uint8 + normalize_batch path == Resize, CenterCrop, ToTensor, Normalize."""
    import torch

    from featx.data import TransformSpec
    spec = TransformSpec(resize=73, crop=64, mean=(0.485, 0.456, 0.406),
                         std=(0.229, 0.224, 0.225))
    files = sorted(digits_dir.rglob("*.png"))[:8]
    per_image = torch.stack([spec.eval_transform()(load_rgb(f)) for f in files])
    u8 = torch.stack([spec.eval_transform_uint8()(load_rgb(f)) for f in files])
    assert u8.dtype == torch.uint8 and u8.shape == (8, 3, 64, 64)
    batched = spec.normalize_batch(u8.contiguous(memory_format=torch.channels_last))
    assert batched.dtype == torch.float32
    assert batched.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batched, per_image)
