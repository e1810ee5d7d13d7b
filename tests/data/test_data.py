"""The three layouts, the seeded stratified split, and image conversion."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featx.data import DataError, load_dataset, parse_split_fractions
from featx.data.images import load_rgb


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

    from featx.data.images import TransformSpec
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


# --- bad files, bad manifests, bad names (issue 10) -------------------------------------------

def _zero_png(path, width: int, height: int) -> None:
    """A valid 1-bit (PIL mode '1') all-black PNG of any size, written in milliseconds.

    PIL would need ``width * height`` bytes of memory to make one (0.9 GB for 30000x30000);
    here the deflate stream of the zero rows is one compressed segment, ended by a full
    flush so it does not refer back, repeated. A 30000x30000 file is ~110 KB.
    """
    import struct
    import zlib

    def chunk(tag, body):
        return (struct.pack(">I", len(body)) + tag + body
                + struct.pack(">I", zlib.crc32(tag + body)))

    total = height * (1 + (width + 7) // 8)  # a filter byte and the packed bits per row
    seg_len = 1 << 20
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = z.compress(b"\0" * seg_len) + z.flush(zlib.Z_FULL_FLUSH)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = z.compress(b"\0" * (total % seg_len)) + z.flush()
    adler = ((total % 65521) << 16) | 1  # adler32 of `total` zero bytes
    idat = b"\x78\x01" + segment * (total // seg_len) + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))


def test_the_zero_png_writer_makes_real_pngs(tmp_path):
    _zero_png(tmp_path / "small.png", 1000, 3000)
    img = Image.open(tmp_path / "small.png")
    assert (img.mode, img.size) == ("1", (1000, 3000))
    assert not np.asarray(img).any()  # decodes completely: the stream and checksum are right


def test_decompression_bombs_are_skipped_and_reported_not_fatal(digits_dir, tmp_path):
    from click.testing import CliRunner

    from featx.cache import Cache
    from featx.cli import main
    _zero_png(digits_dir / "digit0" / "bomb.png", 30000, 30000)  # over 2x PIL's limit: error
    _zero_png(digits_dir / "digit1" / "big.png", 10000, 10000)  # over 1x: PIL only warns
    assert (digits_dir / "digit0" / "bomb.png").stat().st_size < 200_000
    for name in ("digit0/bomb.png", "digit1/big.png"):
        with pytest.raises(OSError, match="decompression bomb"):
            load_rgb(digits_dir / name)
    r = CliRunner().invoke(main, ["extract", "--model", "resnet18", "--weights", "none",
                                  "--image-size", "16", "--workers", "0", "--no-progress",
                                  "--data", str(digits_dir), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "skipped 2 unreadable file(s)" in r.output
    assert "bomb.png: OSError: decompression bomb" in r.output
    skipped = {p: why for _, p, why in Cache(r.stdout.strip().splitlines()[-1]).skipped()}
    assert set(skipped) == {"digit0/bomb.png", "digit1/big.png"}


def _manifest(folder, text: str, name="m.csv"):
    (folder / name).write_text(text, encoding="utf-8")
    return folder / name


def _images(folder, n=6):
    for i in range(n):
        Image.new("L", (8, 8), i * 20).save(folder / f"{i}.png")


@pytest.mark.parametrize("rows, message", [
    ("0.png,a,train\n1.png,,train\n", r"m.csv, line 3: the label is empty"),
    ("0.png,a,train\n1.png\n", r"m.csv, line 3: 1 field\(s\) where the header has 3"),
    ("0.png,a,train\n1,2.png,b,train\n", r"m.csv, line 3: 4 field\(s\) .*quote a path"),
    (",a,train\n", r"m.csv, line 2: the path is empty"),
    ("0.png,a,train\n1.png,b,train\n0.png,a,train\n",
     r"line 4: 0.png is listed twice \(first at line 2\)"),
    ("0.png,a,train\n1.png,b,val\n./1.png,b,test\n",
     r"line 4: ./1.png is listed in two splits \(val at line 3, test here\)"),
    ("0.png,a,train\n1.png,b,train\n2.png,b,tset\n", r"line 4: unknown split value 'tset'"),
])
def test_manifest_row_problems_stop_with_the_line_number(tmp_path, rows, message):
    _images(tmp_path)
    with pytest.raises(DataError, match=message):
        load_dataset(_manifest(tmp_path, "path,label,split\n" + rows))


def test_manifest_problem_is_one_line_from_the_cli(tmp_path):
    from click.testing import CliRunner

    from featx.cli import main
    _images(tmp_path)
    m = _manifest(tmp_path, "path,label\n0.png,a\n1.png,b\n2.png,\n3.png,b\n")
    r = CliRunner().invoke(main, ["extract", "--model", "resnet18", "--data", str(m)])
    assert r.exit_code != 0 and "Traceback" not in r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "line 4: the label is empty" in errors[0], r.output


def test_manifest_with_a_utf8_bom_and_blank_lines_is_read(tmp_path):
    _images(tmp_path)
    text = "path,label,split\n" + "".join(f"{i}.png,{'ab'[i % 2]},train\n" for i in range(6))
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + (text + "\n").encode())
    spec = load_dataset(tmp_path / "bom.csv")
    assert spec.classes == ["a", "b"] and len(spec.splits["train"]) == 6
    (tmp_path / "latin.csv").write_bytes("path,label\n0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_dataset(tmp_path / "latin.csv")


class _Deadline:
    """Fails the test instead of hanging it when a blocking call (a FIFO) is made."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        import signal

        def fail(*_):
            raise TimeoutError("blocked: a FIFO was opened")
        self.old = signal.signal(signal.SIGALRM, fail)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        import signal
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.old)


def test_fifo_in_a_folder_is_skipped_with_a_note(digits_dir):
    import os
    os.mkfifo(digits_dir / "digit1" / "pipe.png")
    with _Deadline(60):
        spec = load_dataset(digits_dir)
    assert all("pipe" not in p for items in spec.splits.values() for p, _ in items)
    assert any("not regular files" in n and "digit1/pipe.png" in n for n in spec.notes)


def test_fifo_in_a_manifest_is_skipped_as_unreadable_not_waited_on(tmp_path):
    import os

    from click.testing import CliRunner

    from featx.cli import main
    _images(tmp_path)
    os.mkfifo(tmp_path / "pipe.png")
    m = _manifest(tmp_path, "path,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(6))
                  + "pipe.png,a\n")
    with pytest.raises(OSError, match="not a regular file \\(a FIFO\\)"), _Deadline(60):
        load_rgb(tmp_path / "pipe.png")
    with _Deadline(120):
        r = CliRunner().invoke(main, ["extract", "--model", "resnet18", "--weights", "none",
                                      "--image-size", "16", "--workers", "0", "--no-progress",
                                      "--split", "1,0,0", "--data", str(m),
                                      "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "skipped 1 unreadable file(s)" in r.output and "pipe.png: OSError: not a regular" \
        in r.output


def test_non_utf8_file_name_is_skipped_and_named(digits_dir, tmp_path):
    import os

    from click.testing import CliRunner

    from featx.cli import main
    bad = os.path.join(os.fsencode(digits_dir / "digit1"), b"bad\xff.png")
    with open(bad, "wb") as f:
        f.write((digits_dir / "digit0").glob("*.png").__next__().read_bytes())
    spec = load_dataset(digits_dir)
    assert any("not valid UTF-8" in n and "digit1/bad\\xff.png" in n for n in spec.notes)
    assert len([p for s in spec.splits.values() for p, _ in s]) == 90
    r = CliRunner().invoke(main, ["extract", "--model", "resnet18", "--weights", "none",
                                  "--image-size", "16", "--workers", "0", "--no-progress",
                                  "--data", str(digits_dir), "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    assert "note: 1 file(s) have names that are not valid UTF-8" in r.output
    assert "digit1/bad\\xff.png" in r.output


def test_sixteen_bit_values_are_rounded_not_truncated(tmp_path):
    # none of these is a multiple of 257: v >> 8, v // 257 and round(v / 256) each get
    # some of them wrong
    values = np.array([[200, 385, 25828, 51400], [65000, 65535, 1, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)  # v/257 never ends in .5
    assert not np.array_equal(expected, values >> 8)
    assert not np.array_equal(expected, values // 257)
    assert not np.array_equal(expected, np.minimum(np.rint(values / 256), 255))
    assert Image.open(tmp_path / "a.png").mode == "I;16"
    np.testing.assert_array_equal(np.asarray(load_rgb(tmp_path / "a.png"))[..., 1], expected)


def test_seed_outside_the_valid_range_names_the_option():
    from featx.data import check_seed
    for bad in (-1, 2**32, 10**30):
        with pytest.raises(DataError, match=rf"seed={bad}: must be an integer from 0 to "
                                            rf"4294967295"):
            check_seed(bad)
    assert check_seed(2**32 - 1) == 2**32 - 1


def test_data_and_cache_import_without_torch():
    """Finding the images, fixing the split and reading a cache need no torch (seconds to
    import): a fresh interpreter that imports featx.data and featx.cache has not loaded it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    script = ("import sys\nimport featx.cache, featx.data\n"
              "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]"
