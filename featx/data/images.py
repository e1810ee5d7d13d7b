"""Decoding image files and transforming them into tensors.

:func:`load_rgb` turns any file PIL reads into 8-bit RGB (or raises ``OSError``);
:class:`TransformSpec` is a model's eval (and fine-tuning) transform; :class:`ImageFiles`
serves one split's files to a DataLoader, a bad file as a reason rather than an exception.
Kept apart from :mod:`featx.data` so that finding the images and fixing the split do not
import torch.
"""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from featx.data.spec import DataParameterError

__all__ = [
    "ImageFiles",
    "TransformSpec",
    "load_rgb",
]


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully and return an 8-bit RGB image.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted; 16-bit
    values ``v`` become ``round(v / 257)``, so 0..65535 maps onto 0..255 with every 8-bit
    value hit by an equal share (PIL itself reads 16-bit *RGB* PNGs by keeping the high byte).
    Raises ``OSError`` (or PIL's ``UnidentifiedImageError``, a subclass) when the file cannot
    be decoded or is truncated, is not a regular file (a FIFO would block ``open`` forever),
    or is larger than PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; PIL's
    warning between 1x and 2x the limit counts too: such a file would take gigabytes).
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file ({_file_kind(mode)}); it was not opened")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd metadata; errors still raise
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise OSError(f"decompression bomb: {exc}".split(", could be")[0]
                          + "; raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine") from None
        with img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(img, dtype=np.float64)
                scale = 1 / 257 if img.mode != "F" or arr.max() > 1 else 255.0
                arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
                return Image.fromarray(arr, "L").convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return img.convert("RGB")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a plain file"


@dataclass(frozen=True)
class TransformSpec:
    """An evaluation transform: resize the short side, center crop, normalise.

    ``resize`` and ``crop`` are in pixels; ``mean``/``std`` per RGB channel on 0..1 values.
    """

    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    @classmethod
    def from_weights(cls, weights, image_size: int | None = None) -> "TransformSpec":
        """The weights' own eval transform; ``image_size`` overrides the crop, resize scaled."""
        t = weights.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        if image_size is not None:
            if image_size < 16:
                raise DataParameterError("image_size", image_size, "is too small; use at least "
                                         "16.", sep=" ")
            resize = int(round(image_size * resize / crop))
            crop = image_size
        return cls(resize, crop, tuple(t.mean), tuple(t.std), t.interpolation.value)

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    def eval_transform(self) -> T.Compose:
        return T.Compose([*self.eval_transform_uint8().transforms[:-1], T.ToTensor(),
                          T.Normalize(self.mean, self.std)])

    def eval_transform_uint8(self) -> T.Compose:
        """Resize and crop only: ``(3, crop, crop)`` uint8, to be finished by
        :meth:`normalize_batch`. Extraction uses this pair: per image, float conversion and
        normalising cost as much as resizing, and per batch a third of that (BENCHMARKS.md);
        a uint8 batch is also a quarter of the bytes to collate and to copy to a GPU, where
        the normalisation then runs."""
        return T.Compose([
            T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation),
                     antialias=True),
            T.CenterCrop(self.crop),
            T.PILToTensor(),
        ])

    def normalize_batch(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 -> float32 normalised, the same operations (and so the same
        bits) as ``ToTensor`` + ``Normalize`` per image; keeps the input's memory format."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return images.float().div_(255).sub_(mean).div_(std)

    def train_transform(self) -> T.Compose:
        """Random resized crop and horizontal flip, then normalise (for fine-tuning)."""
        return T.Compose([
            T.RandomResizedCrop(self.crop, interpolation=T.InterpolationMode(self.interpolation),
                                antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])


class ImageFiles(torch.utils.data.Dataset):
    """``(image, label, index, error)`` for each ``(relpath, label)`` of one split.

    A file that cannot be decoded does not raise: it yields a zero image and the reason in
    ``error`` (``""`` when fine), so a DataLoader batch can carry it and the caller can drop
    and report it. Shapes: image ``(3, crop, crop)``, float32 (or ``dtype``).
    """

    def __init__(self, root: Path, items: list[tuple[str, int]], transform, crop: int,
                 dtype: torch.dtype = torch.float32):
        self.root = Path(root)
        self.items = items
        self.transform = transform
        self.crop = crop
        self.dtype = dtype  # of the stand-in zero image for a bad file: the transform's

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        rel, label = self.items[i]
        try:
            # PIL's decoders raise more than OSError on malformed files (struct.error,
            # IndexError, ...): whatever decoding one file raises skips that file only
            img = self.transform(load_rgb(self.root / rel))
            err = ""
        except Exception as exc:
            img = torch.zeros(3, self.crop, self.crop, dtype=self.dtype)
            err = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:300]
        return img, label, i, err
