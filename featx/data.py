"""Finding images and labels, the split, the transform, and files that cannot be read.

Three layouts are accepted (see :func:`load_dataset`):

* a folder with ``train/`` (and optionally ``val/``, ``test/``), each holding class folders;
* a folder of class folders, which is split per class, stratified and seeded;
* a CSV manifest with columns ``path,label[,split]`` (paths relative to the CSV's folder).

The split is part of the data: :class:`DatasetSpec` holds the exact file list of every split,
and the same inputs always give the same lists.
"""
from __future__ import annotations

import csv
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DataError",
    "DatasetSpec",
    "ImageFiles",
    "TransformSpec",
    "load_dataset",
    "load_rgb",
    "parse_split_fractions",
]

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm")


class DataError(ValueError):
    """The dataset cannot be used as given; the message says what to change."""


@dataclass
class DatasetSpec:
    """A dataset with its split fixed.

    Attributes
    ----------
    root : Path
        Folder the relative paths are resolved against.
    name : str
        Short name, used in cache file names.
    classes : list of str
        Class names; a label is an index into this list.
    splits : dict
        ``{"train": [(relpath, label), ...], "val": [...], "test": [...]}``; a split may be
        absent (no ``val/`` folder, a zero fraction).
    layout : str
        ``"folders-split"``, ``"folders"`` or ``"csv"``.
    seed, fractions
        How the split was made, for ``"folders"`` (and a CSV without a split column).
    notes : list of str
        What was done on the way that the user should hear (empty classes skipped, ...).
    """

    root: Path
    name: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    layout: str
    seed: int | None = None
    fractions: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)

    def fingerprint(self) -> str:
        """sha256 over every split's (path, label, file size): changes when the files do.

        Sizes rather than contents keep this fast on large sets; mtimes are left out so that
        a copied dataset keeps its fingerprint.
        """
        h = hashlib.sha256()
        h.update(json.dumps(self.classes).encode())
        for split in SPLITS:
            for rel, label in self.splits.get(split, []):
                try:
                    size = (self.root / rel).stat().st_size
                except OSError:
                    size = -1
                h.update(f"{split}\0{rel}\0{label}\0{size}\n".encode())
        return h.hexdigest()

    def counts(self) -> dict[str, list[int]]:
        """Images per class for each split."""
        out = {}
        for split, items in self.splits.items():
            c = np.bincount([lab for _, lab in items], minlength=len(self.classes))
            out[split] = c.tolist()
        return out


def parse_split_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> ``(0.7, 0.15, 0.15)``; checks the values."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or parts[0] <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise DataError(f"--split {text!r} must be three fractions train,val,test that sum to 1 "
                        f"with train > 0, e.g. 0.7,0.15,0.15")
    return parts  # type: ignore[return-value]


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def load_dataset(path: str | Path, *, split: tuple[float, float, float] = (0.7, 0.15, 0.15),
                 seed: int = 0) -> DatasetSpec:
    """Find the images and labels under ``path`` and fix the split.

    Parameters
    ----------
    path : str or Path
        A folder (pre-split or class folders) or a ``.csv`` manifest.
    split : tuple of 3 floats, default (0.7, 0.15, 0.15)
        Train/val/test fractions, used only when the data does not carry its own split.
    seed : int, default 0
        Seed of that split.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder.")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(f"--data {path}: expected a folder or a .csv manifest.")
        spec = _from_csv(path, split, seed)
    elif (path / "train").is_dir():
        spec = _from_split_folders(path)
    else:
        spec = _from_class_folders(path, split, seed)
    _check_train(spec)
    return spec


def _check_train(spec: DatasetSpec) -> None:
    train = spec.splits.get("train", [])
    if not train:
        raise DataError(f"{spec.root}: the train split is empty.")
    present = {lab for _, lab in train}
    if len(present) < 2:
        raise DataError(f"{spec.root}: the train split holds a single class "
                        f"({spec.classes[next(iter(present))]}); a classifier needs at least two.")


def _from_split_folders(root: Path) -> DatasetSpec:
    notes = []
    class_names = sorted({d.name for s in SPLITS if (root / s).is_dir()
                          for d in _class_dirs(root / s)})
    index = {c: i for i, c in enumerate(class_names)}
    splits: dict[str, list[tuple[str, int]]] = {}
    for s in SPLITS:
        if not (root / s).is_dir():
            continue
        items = []
        for d in _class_dirs(root / s):
            files = _images_in(d)
            if not files:
                notes.append(f"{s}/{d.name} holds no images")
            items += [(f.relative_to(root).as_posix(), index[d.name]) for f in files]
        splits[s] = items
    empty = [c for c in class_names if not any(lab == index[c] for _, lab in splits["train"])]
    if empty:
        raise DataError(f"{root}: class(es) {', '.join(empty)} have no images in train/; add "
                        f"some or remove those folders.")
    return DatasetSpec(root, root.name, class_names, splits, "folders-split", notes=notes)


def _split_per_class(items_by_class: dict[int, list[str]], classes: list[str],
                     fractions: tuple[float, float, float], seed: int, root: Path
                     ) -> dict[str, list[tuple[str, int]]]:
    """Stratified, seeded split: each class is shuffled and cut by the fractions."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    need = 1 + sum(f > 0 for f in fractions[1:])
    for label, files in sorted(items_by_class.items()):
        n = len(files)
        n_val = max(1, round(n * fractions[1])) if fractions[1] > 0 else 0
        n_test = max(1, round(n * fractions[2])) if fractions[2] > 0 else 0
        if n - n_val - n_test < 1:
            raise DataError(
                f"{root}: class {classes[label]!r} has {n} image(s); a "
                f"{','.join(f'{f:g}' for f in fractions)} split needs at least {need} per class. "
                f"Add images, remove the class, or change --split.")
        order = rng.permutation(n)
        picked = [files[i] for i in order]
        out["test"] += [(p, label) for p in picked[:n_test]]
        out["val"] += [(p, label) for p in picked[n_test:n_test + n_val]]
        out["train"] += [(p, label) for p in picked[n_test + n_val:]]
    for s in SPLITS:
        out[s].sort()
    return {s: v for s, v in out.items() if v}


def _from_class_folders(root: Path, fractions, seed) -> DatasetSpec:
    notes = []
    dirs = _class_dirs(root)
    if not dirs:
        raise DataError(f"{root}: no class folders found. Expected {root}/CLASS/*.png, "
                        f"{root}/train/CLASS/*.png, or a CSV manifest.")
    found = {}
    for d in dirs:
        files = [f.relative_to(root).as_posix() for f in _images_in(d)]
        if files:
            found[d.name] = files
        else:
            notes.append(f"class folder {d.name}/ holds no images and was left out")
    classes = sorted(found)
    by_class = {i: found[c] for i, c in enumerate(classes)}
    splits = _split_per_class(by_class, classes, fractions, seed, root)
    return DatasetSpec(root, root.name, classes, splits, "folders", seed, tuple(fractions), notes)


def _from_csv(path: Path, fractions, seed) -> DatasetSpec:
    root = path.parent
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "path" not in cols or "label" not in cols:
            raise DataError(f"{path}: a manifest needs a header with columns path,label[,split]; "
                            f"found {','.join(cols) or 'nothing'}.")
        rows = [{k.strip().lower(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    if not rows:
        raise DataError(f"{path}: the manifest lists no images.")
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    has_split = "split" in cols and any(r.get("split") for r in rows)
    if has_split:
        bad = sorted({r["split"] for r in rows} - set(SPLITS))
        if bad:
            raise DataError(f"{path}: unknown split value(s) {', '.join(map(repr, bad))}; "
                            f"use train, val or test.")
        splits = {s: sorted((r["path"], index[r["label"]]) for r in rows if r["split"] == s)
                  for s in SPLITS}
        splits = {s: v for s, v in splits.items() if v}
        return DatasetSpec(root, path.stem, classes, splits, "csv")
    by_class = {i: sorted(r["path"] for r in rows if r["label"] == c) for i, c in enumerate(classes)}
    splits = _split_per_class(by_class, classes, fractions, seed, root)
    return DatasetSpec(root, path.stem, classes, splits, "csv", seed, tuple(fractions))


# --- decoding ---------------------------------------------------------------------------------

def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully and return an 8-bit RGB image.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted; 16-bit
    values are scaled by 1/257 so that 65535 maps to 255. Raises ``OSError`` (or PIL's
    ``UnidentifiedImageError``) when the file cannot be decoded or is truncated.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd metadata; errors still raise
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.asarray(img, dtype=np.float32)
                scale = 255.0 / 65535.0 if img.mode != "F" or arr.max() > 1 else 255.0
                arr = np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8)
                return Image.fromarray(arr, "L").convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            return img.convert("RGB")


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
                raise DataError(f"--image-size {image_size} is too small; use at least 16.")
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
            img = self.transform(load_rgb(self.root / rel))
            err = ""
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            img = torch.zeros(3, self.crop, self.crop, dtype=self.dtype)
            err = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        return img, label, i, err
