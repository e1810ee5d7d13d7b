"""The settings of extract, fit-heads, finetune and compare, and the choices they accept.

One place for every default: the library validates against these choices and the CLI
builds its options from these fields (default, and help from ``metadata["help"]``). The
module imports neither torch nor sklearn, so ``featx --help`` and a no-op re-run of a
finished command stay fast. The library modules re-export their config
(``from featx.finetune import FinetuneConfig`` keeps working).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BACKENDS", "CLASS_WEIGHTS", "CompareConfig", "DEFAULT_HEADS", "ExtractConfig",
           "FINETUNE_MODES", "FinetuneConfig", "HeadsConfig", "LOSSES", "OPTIMIZERS",
           "PRECISIONS", "SCHEDULERS", "SELECT_MODES", "STORE_DTYPES"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STORE_DTYPES = ("float32", "float16")    # dtypes a cache stores its features in
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "none")
LOSSES = ("ce", "weighted", "focal")
SELECT_MODES = ("val", "cv")
CLASS_WEIGHTS = ("none", "balanced")     # "none" is None in the configs
BACKENDS = ("loky", "dask", "ray")      # joblib backends the fits can run on
DEFAULT_HEADS = ("linear", "logistic", "svm", "mlp")
# --finetune choice -> the --freeze settings it runs
FINETUNE_MODES = {"none": (), "full": ("none",), "backbone": ("backbone",),
                  "both": ("backbone", "none")}


def _opt(default, help: str):
    """A field with a default and the help text of its command-line option."""
    return field(default=default, metadata={"help": help})


# settings that several configs share, with the same default and help: (default, help)
_SHARED = {
    "weights": ("imagenet", "ImageNet weights (torchvision's hub cache; timm: its pretrained "
                "file in the Hugging Face cache), random init, or a .pth state dict (timm: "
                "state dict or checkpoint)."),
    "image_size": (None, "Crop size in pixels; resize scaled to match [default: the weights' "
                   "own, usually 224]."),
    "device": ("auto", "auto, cpu or cuda."),
    "precision": ("auto", "auto: bf16/fp16 on GPU; on CPU bf16 where it is native (AMX, "
                  "AVX512-BF16), else fp32."),
    "workers": (None, "DataLoader worker processes, at most one per CPU core [default: CPU "
                "cores, at most 8; extract on the CPU: a quarter of the cores]."),
    "batch_size": (32, "Images per batch."),
    "seed": (0, "Seed of random init and training (not of the split: --split-seed), "
             "0..4294967295."),
    "progress": (True, "Show a progress bar."),
    "backend": ("loky", "Where head fits run: loky processes here, or a dask / ray cluster "
                "(pip install featx[dask] / featx[ray]); results are the same."),
    "scheduler": (None, "A running dask scheduler (tcp://host:8786) or ray cluster (host:6379) "
                  "[default: start a local one of --jobs workers]."),
}


def _shared(name: str):
    """The field of a setting in ``_SHARED``."""
    return _opt(*_SHARED[name])


@dataclass
class ExtractConfig:
    """Everything that decides what one extraction does.

    ``pools`` are the n of ``AdaptiveAvgPool2d(n)``; ``image_size`` overrides the weights'
    crop (pixels); ``workers=None`` means one DataLoader worker per CPU core (at most 8) on a
    GPU, and a quarter of the cores on the CPU (none on 2 cores). ``compile`` runs the model
    through ``torch.compile`` (inductor, frozen weights): faster per image, but it costs
    seconds to tens of seconds up front, so it pays only on large datasets (BENCHMARKS.md).
    ``seed`` seeds random weights (``weights="none"``); the split's seed is the data's.
    """

    model: str
    weights: str = _shared("weights")
    pools: tuple[int, ...] = _opt((1,), "AdaptiveAvgPool2d sizes to store besides "
                                  "penultimate, e.g. 1,2,4,8.")
    image_size: int | None = _shared("image_size")
    batch_size: int = _shared("batch_size")
    workers: int | None = _shared("workers")
    device: str = _shared("device")
    precision: str = _shared("precision")
    store: str = _opt("float32", "dtype of the stored features.")
    out_dir: Path = _opt(Path("cache"), "Folder for the cache files.")
    overwrite: bool = _opt(False, "Replace a cache made from other inputs.")
    seed: int = _shared("seed")
    progress: bool = _shared("progress")
    compile: bool = _opt(False, "torch.compile the model: 10-15 s up front, then 1.1x (fp32) "
                         "to ~2x (bf16) faster per image; pays from a couple of thousand "
                         "images.")


@dataclass
class FinetuneConfig:
    """Everything that decides what one fine-tuning run does.

    ``freeze``: ``"none"``, ``"backbone"`` (only the new head trains) or a stage name of the
    model (frozen up to and including it, see :func:`list_stages`). ``pool``: the head reads
    ``AdaptiveAvgPool2d(pool)`` of the last spatial map (``C·pool·pool`` inputs); ``1`` uses the
    model's own penultimate. ``early_stop``: patience in epochs on the val loss, ``0`` = off.
    ``lr`` is the head's learning rate; the backbone gets ``lr * backbone_lr_mult``.
    ``batch_size`` is per process under torchrun. ``workers=None``: one DataLoader worker
    per CPU core (at most 8; under torchrun the node's cores shared among its processes).
    ``seed``: the new head's init, shuffling and augmentation; the split's seed is the data's.
    """

    model: str
    weights: str = _shared("weights")
    freeze: str = _opt("none", "Train everything, only the new head, or freeze up to and "
                       "including STAGE.")
    epochs: int = _opt(30, "Fine-tuning epochs.")
    batch_size: int = _opt(32, "Images per step; under torchrun per process (global = this x "
                           "processes).")
    optimizer: str = _opt("sgd", "SGD uses momentum 0.9.")
    lr: float = _opt(1e-3, "Learning rate of the new head.")
    backbone_lr_mult: float = _opt(0.1, "Backbone learning rate = lr x this.")
    weight_decay: float = _opt(0.0, "Weight decay of the optimizer.")
    scheduler: str = _opt("cosine", "Per epoch: cosine to zero over the run; step: x0.1 every "
                          "epochs//3.")
    loss: str = _opt("ce", "Cross-entropy, class-weighted cross-entropy (train counts), focal.")
    focal_gamma: float = _opt(2.0, "Focal loss gamma (0 = ce).")
    image_size: int | None = _shared("image_size")
    augment: bool = _opt(True, "Random resized crop + flip on the train split.")
    pool: int = _opt(1, "Head on AdaptiveAvgPool2d(N) of the last spatial map (C*N*N inputs); "
                     "1 = the model's own penultimate.")
    early_stop: int = _opt(0, "Stop when the val loss has not improved for N epochs (0 = off).")
    precision: str = _shared("precision")
    device: str = _shared("device")
    workers: int | None = _shared("workers")
    seed: int = _shared("seed")
    out_dir: Path = _opt(Path("results"), "Folder for the run folders.")
    resume: bool = _opt(False, "Continue the same run from its last.pt.")
    progress: bool = _shared("progress")


@dataclass
class HeadsConfig:
    """What ``featx fit-heads`` does, independent of the CLI.

    ``features``: names, or ``("all",)`` for penultimate and every pool{n}. ``select``:
    ``"val"`` (falls back to CV when a cache has no val split) or ``"cv"``. ``jobs``: the cap
    on parallel fits (runs x grid points) with loky, the local cluster's size with dask or
    ray and no ``scheduler``. ``backend``/``scheduler``: where the fits run (see
    :func:`heads_backend`). ``pca``: components for features that do not fit (0: stream
    them instead). ``memory_limit_mb``: None = measured (see :func:`memory_limit`).
    """

    heads: tuple[str, ...] = _opt(DEFAULT_HEADS, "Heads to fit: linear, logistic, svm, mlp, "
                                  "rbf, knn, sgd.")
    features: tuple[str, ...] = _opt(("penultimate",), "Cached features to fit on; all = "
                                     "penultimate + every pool{n}.")
    select: str = _opt("val", "Choose hyperparameters on the val split (CV on train when a "
                       "cache has none), or always by CV on train.")
    cv: int = _opt(5, "Folds for CV selection.")
    class_weight: str | None = _opt(None, "balanced: weight classes by inverse train "
                                    "frequency (not mlp/knn).")
    standardize: bool = _opt(True, "StandardScaler fitted on the fit rows, inside each "
                             "pipeline.")
    jobs: int = 1
    seed: int = _opt(0, "random_state of every estimator, 0..4294967295.")
    out_dir: Path = _opt(Path("results"), "Folder for results and heads_summary.csv.")
    memory_limit_mb: float | None = _opt(None, "Memory a fit may use [default: 80% of "
                                         "available memory].")
    pca: int = _opt(0, "Features that do not fit in memory: reduce to N PCA components "
                    "(IncrementalPCA on train) instead of streaming an SGD head.")
    backend: str = _shared("backend")
    scheduler: str | None = _shared("scheduler")
    refit: bool = _opt(False, "Fit again even where OUT already holds a result made from the "
                       "same cache with the same settings (reused by default).")


@dataclass
class CompareConfig:
    """Settings of one comparison; each maps to an option of extract, fit-heads or finetune.

    ``seed`` seeds everything but the split (random weights, head fits, fine-tuning): the
    split comes with the data.
    """

    models: tuple[str, ...]
    pools: tuple[int, ...] = _opt((1, 2, 4, 8), "Pool sizes to extract (besides penultimate).")
    heads: tuple[str, ...] = _opt(DEFAULT_HEADS, "Heads to fit on each feature.")
    finetune: str = _opt("backbone", "Fine-tuning runs: full (--freeze none), backbone (head "
                         "only), both.")
    epochs: int = _opt(10, "Fine-tuning epochs.")
    weights: str = _shared("weights")
    image_size: int | None = _shared("image_size")
    batch_size: int = _shared("batch_size")
    workers: int | None = _shared("workers")
    device: str = _shared("device")
    precision: str = _shared("precision")
    seed: int = _shared("seed")
    class_weight: str | None = _opt(None, "Class weights for the heads.")
    loss: str = _opt("ce", "Fine-tuning loss: cross-entropy, class-weighted, focal.")
    lr: float = _opt(1e-3, "Fine-tuning learning rate.")
    optimizer: str = _opt("sgd", "Fine-tuning optimizer.")
    jobs: int = _opt(1, "Parallel head fits (the local cluster's workers with dask/ray).")
    backend: str = _shared("backend")
    scheduler: str | None = _shared("scheduler")
    cache_dir: Path = _opt(Path("cache"), "Where the feature caches go.")
    out: Path = _opt(Path("results/compare"), "Results folder (report in OUT/report).")
    overwrite: bool = _opt(False, "Replace caches made from other inputs.")
    progress: bool = _shared("progress")
