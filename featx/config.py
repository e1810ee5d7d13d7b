"""The settings of extract, fit-heads, finetune and compare, and the choices they accept.

One place for every default and every rule: a field declares its default, its help text
and what it accepts (``choices``, ``min``/``max``, a ``problem`` text); :func:`check_settings`
checks a config against those declarations for the library, and the CLI builds its options
(default, help, click type) and its configs from the same fields. The
module imports neither torch nor sklearn, so ``featx --help`` and a no-op re-run of a
finished command stay fast. The library modules re-export their config
(``from featx.finetune import FinetuneConfig`` keeps working).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from pathlib import Path

from featx.errors import ParameterError

__all__ = ["BACKENDS", "CLASS_WEIGHTS", "CompareConfig", "DEFAULT_HEADS", "DEFAULT_MAX_WORKERS",
           "ENGINES", "ExtractConfig",
           "FINETUNE_MODES", "FinetuneConfig", "HeadsConfig", "LOSSES", "MAX_SEED", "OPTIMIZERS",
           "PRECISIONS", "RepeatConfig", "ReportConfig", "SCHEDULERS", "SELECT_MODES", "SOLVERS", "STORE_DTYPES", "SubsetConfig",
           "check_setting",
           "check_settings", "rule_of"]

# the most DataLoader workers a default picks (an explicit --workers may ask for more, up to
# one per usable core: featx.runtime.cap_workers)
DEFAULT_MAX_WORKERS = 8
# numpy's and sklearn's seeds are unsigned 32-bit; torch's would take more, but one seed
# feeds all of them
MAX_SEED = 2**32 - 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# what runs the frozen forward (featx/backbones/engines.py); the last two are optional extras
ENGINES = ("auto", "torch", "onnxruntime", "openvino")
STORE_DTYPES = ("float32", "float16")    # dtypes a cache stores its features in
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "step", "none")
LOSSES = ("ce", "weighted", "focal")
SELECT_MODES = ("val", "cv")
CLASS_WEIGHTS = ("none", "balanced")     # "none" is None in the configs
BACKENDS = ("loky", "dask", "ray")      # joblib backends the fits can run on
SOLVERS = ("auto", "torch", "sklearn")  # who fits the linear family (featx.heads.batched)
DEFAULT_HEADS = ("linear", "logistic", "svm", "mlp")
# --finetune choice -> the --freeze settings it runs
FINETUNE_MODES = {"none": (), "full": ("none",), "backbone": ("backbone",),
                  "both": ("backbone", "none")}


def _opt(default, help: str, *, choices=None, min=None, max=None, min_open: bool = False,
         integer: bool | None = None, problem: str | None = None):
    """A field with a default, the help text of its command-line option and what it accepts.

    ``choices``: the values it may take (a ``None`` default makes ``"none"`` among them mean
    ``None``); ``min``/``max``: bounds of a number, ``min`` excluded when ``min_open``;
    ``integer``: whole numbers only [default: whether the default is an int]; ``problem``:
    the message of a refused value [default: from the rule, e.g. "must be at least 1."].
    """
    rule = {}
    if choices is not None:
        rule["choices"] = tuple(choices)
    if min is not None or max is not None:
        rule.update(min=min, max=max, min_open=min_open,
                    integer=integer if integer is not None else
                    isinstance(default, int) and not isinstance(default, bool))
    if rule:
        rule["problem"] = problem or _problem(rule)
    return field(default=default, metadata={"help": help, "rule": rule})


def _problem(rule: dict) -> str:
    """The message for a value ``rule`` refuses."""
    if "choices" in rule:
        names = rule["choices"]
        return f"use {' or '.join(names)}." if len(names) == 2 else \
            f"use one of {', '.join(names)}."
    low, high = rule["min"], rule["max"]
    if high is not None and low is not None:
        return f"must be {'an integer' if rule['integer'] else 'a number'} {low}..{high}."
    if rule["min_open"]:
        return f"must be more than {low}."
    return "must be 0 or more." if low == 0 else f"must be at least {low}."


def rule_of(config, name: str) -> dict:
    """What the field ``name`` of ``config`` (a config class or instance) accepts: a dict
    with ``choices``, or ``min``/``max``/``min_open``/``integer``, and ``problem``; ``{}``
    where anything goes."""
    return config.__dataclass_fields__[name].metadata.get("rule", {})


def _accepts(rule: dict, value, default) -> bool:
    if value is None and default is None:  # an optional setting left unset
        return True
    if "choices" in rule:
        # "none" is how the CLI writes None, not a value of its own
        return value in rule["choices"] and not (value == "none" and default is None)
    if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if rule["integer"] else numbers.Real):
        return False
    if not math.isfinite(value):
        return False
    low, high = rule["min"], rule["max"]
    if low is not None and (value <= low if rule["min_open"] else value < low):
        return False
    return high is None or value <= high


def check_setting(config, name: str, value) -> None:
    """Raise :class:`~featx.errors.ParameterError` naming ``name`` if the rule declared on
    that field of ``config`` (a config class or instance) refuses ``value``."""
    spec = config.__dataclass_fields__[name]
    rule = spec.metadata.get("rule", {})
    if rule and not _accepts(rule, value, spec.default):
        raise ParameterError(name, value, rule["problem"])


def check_settings(config) -> None:
    """Raise :class:`~featx.errors.ParameterError` naming the first field of ``config`` (in
    declaration order) whose value its declared rule refuses."""
    for spec in fields(config):
        check_setting(config, spec.name, getattr(config, spec.name))


_SEED_RULE = dict(min=0, max=MAX_SEED, problem=f"must be an integer from 0 to {MAX_SEED}.")

# settings that several configs share, with the same default, help and rule:
# (default, help[, rule])
_SHARED = {
    "weights": ("imagenet", "ImageNet weights (torchvision's hub cache; timm: its pretrained "
                "file in the Hugging Face cache), random init, or a .pth state dict (timm: "
                "state dict or checkpoint)."),
    "image_size": (None, "Crop size in pixels; resize scaled to match [default: the weights' "
                   "own, usually 224].", dict(min=16, max=2048, integer=True)),
    "device": ("auto", "auto, cpu or cuda."),
    "precision": ("auto", "auto: bf16/fp16 on GPU, and on CPUs where bf16 is native (AMX, "
                  "AVX512-BF16), for models whose features bf16 keeps within 1e-2 of fp32 "
                  "(docs/engines.md); else fp32.", dict(choices=PRECISIONS)),
    "engine": ("auto", "What runs the frozen forward: auto picks the fastest installed for "
               "the device and precision (docs/engines.md); onnxruntime / openvino: CPU, "
               "fp32 (pip install featx[onnx] / featx[openvino]).", dict(choices=ENGINES)),
    "workers": (None, f"DataLoader worker processes, at most one per CPU core [default: CPU "
                f"cores, at most {DEFAULT_MAX_WORKERS}; extract on the CPU: a quarter of the "
                f"cores].", dict(min=0, integer=True)),
    "batch_size": (32, "Images per batch.", dict(min=1)),
    "seed": (0, "Seed of random init and training (not of the split: --split-seed), "
             "0..4294967295.", _SEED_RULE),
    "progress": (True, "Show a progress bar."),
    "backend": ("loky", "Where head fits run: loky processes here, or a dask / ray cluster "
                "(pip install featx[dask] / featx[ray]); results are the same.",
                dict(choices=BACKENDS)),
    "bootstrap": (1000, "Bootstrap resamples of the test images (stratified by class, seeded) "
                  "for the 95% intervals and paired tests; 0 = none.", dict(min=0)),
    "shots": ((), "Label efficiency: labelled train images per class, e.g. 1,2,4,8,16; one run "
              "per shot count and draw, val and test untouched."),
    "train_fraction": ((), "Label efficiency: stratified fractions of the train split, e.g. "
                       "0.01,0.1,0.5,1; one run per fraction and draw."),
    "draws": (3, "Seeded draws of each --shots / --train-fraction subset.", dict(min=1)),
    "repeats": (1, "Repeat over K splits (data featx splits: split seeds S..S+K-1, one "
                "extraction) or K seeds (pre-split data: seeds of head init and training).",
                dict(min=1, max=100)),
    "scheduler": (None, "A running dask scheduler (tcp://host:8786) or ray cluster (host:6379) "
                  "[default: start a local one of --jobs workers]."),
}


def _shared(name: str):
    """The field of a setting in ``_SHARED``."""
    default, help, *rule = _SHARED[name]
    return _opt(default, help, **(rule[0] if rule else {}))


@dataclass
class ExtractConfig:
    """Everything that decides what one extraction does.

    ``pools`` are the n of ``AdaptiveAvgPool2d(n)``; ``image_size`` overrides the weights'
    crop (pixels); ``workers=None`` means one DataLoader worker per CPU core (at most :data:`DEFAULT_MAX_WORKERS`) on a
    GPU, and a quarter of the cores on the CPU (none on 2 cores). ``compile`` runs the model
    through ``torch.compile`` (inductor, frozen weights): faster per image, but it costs
    seconds to tens of seconds up front, so it pays only on large datasets (BENCHMARKS.md).
    ``seed`` seeds random weights (``weights="none"``); the split's seed is the data's.
    """

    model: str
    weights: str = _shared("weights")
    pools: tuple[int, ...] = _opt((1,), "AdaptiveAvgPool2d sizes to store besides "
                                  "penultimate, e.g. 1,2,4,8.")
    layers: tuple[str, ...] = _opt((), "Intermediate layers to store too, each pooled like "
                                   "the last map (pool1 when no --pool): module names as "
                                   "`featx models --layers MODEL` lists them, 'stages' for "
                                   "every stage, 'last4' for a ViT's DINOv2 linear-eval "
                                   "features; comma-separated.")
    keep_map: bool = _opt(False, "Also store the spatial maps of the last map and of every "
                          "--layers layer, so `featx pool CACHE --pool N` adds pool sizes "
                          "later without the backbone.")
    map_store: str = _opt("float16", "dtype of the kept maps (--keep-map).",
                          choices=STORE_DTYPES)
    image_size: int | None = _shared("image_size")
    batch_size: int = _shared("batch_size")
    workers: int | None = _shared("workers")
    device: str = _shared("device")
    precision: str = _shared("precision")
    engine: str = _shared("engine")
    store: str = _opt("float32", "dtype of the stored features.", choices=STORE_DTYPES)
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
    model's own penultimate. ``cut``: a stage (``spec.layer_stages``) after which the network
    is truncated, the head then reads ``AdaptiveAvgPool2d(pool)`` of that stage's output
    (``None``: the whole network). ``early_stop``: patience in epochs on the val loss, ``0`` = off.
    ``lr`` is the head's learning rate; the backbone gets ``lr * backbone_lr_mult``.
    ``batch_size`` is per process under torchrun. ``workers=None``: one DataLoader worker
    per CPU core (at most :data:`DEFAULT_MAX_WORKERS`; under torchrun the node's cores shared among its processes).
    ``seed``: the new head's init, shuffling and augmentation; the split's seed is the data's.
    """

    model: str
    weights: str = _shared("weights")
    freeze: str = _opt("none", "Train everything, only the new head, or freeze up to and "
                       "including STAGE.")
    epochs: int = _opt(30, "Fine-tuning epochs.", min=1)
    batch_size: int = _opt(32, "Images per step; under torchrun per process (global = this x "
                           "processes).", min=1)
    optimizer: str = _opt("sgd", "SGD uses momentum 0.9.", choices=OPTIMIZERS)
    lr: float = _opt(1e-3, "Learning rate of the new head.", min=0, min_open=True,
                     problem="must be a positive number, e.g. 1e-3.")
    backbone_lr_mult: float = _opt(0.1, "Backbone learning rate = lr x this.", min=0,
                                   problem="must be 0 or more (0 keeps the backbone's weights "
                                   "fixed but its BatchNorm statistics still adapt).")
    weight_decay: float = _opt(0.0, "Weight decay of the optimizer.", min=0)
    scheduler: str = _opt("cosine", "Per epoch: cosine to zero over the run; step: x0.1 every "
                          "epochs//3.", choices=SCHEDULERS)
    loss: str = _opt("ce", "Cross-entropy, class-weighted cross-entropy (train counts), focal.",
                     choices=LOSSES)
    focal_gamma: float = _opt(2.0, "Focal loss gamma (0 = ce).", min=0,
                              problem="must be 0 or more (0 is cross-entropy).")
    image_size: int | None = _shared("image_size")
    augment: bool = _opt(True, "Random resized crop + flip on the train split.")
    pool: int = _opt(1, "Head on AdaptiveAvgPool2d(N) of the last spatial map (C*N*N inputs); "
                     "1 = the model's own penultimate.", min=1, max=64)
    cut: str | None = _opt(None, "Fine-tune the network truncated after this stage (its later "
                           "stages dropped), the head on AdaptiveAvgPool2d(--pool) of its "
                           "output; --list-stages shows the stages.")
    early_stop: int = _opt(0, "Stop when the val loss has not improved for N epochs (0 = off).",
                           min=0, problem="give a patience in epochs (at least 1), or 0 to "
                           "train all epochs.")
    precision: str = _shared("precision")
    device: str = _shared("device")
    workers: int | None = _shared("workers")
    seed: int = _shared("seed")
    out_dir: Path = _opt(Path("results"), "Folder for the run folders.")
    bootstrap: int = _shared("bootstrap")
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
                       "cache has none), or always by CV on train.", choices=SELECT_MODES)
    cv: int = _opt(5, "Folds for CV selection.", min=2, problem="need at least 2 folds.")
    class_weight: str | None = _opt(None, "balanced: weight classes by inverse train "
                                    "frequency (not mlp/knn).", choices=CLASS_WEIGHTS)
    standardize: bool = _opt(True, "StandardScaler fitted on the fit rows, inside each "
                             "pipeline.")
    jobs: int = _opt(1, "Parallel fits, runs x grid points; with dask/ray and no --scheduler, "
                     "the local cluster's workers.", min=1)
    seed: int = _opt(0, "random_state of every estimator, 0..4294967295.",
                     **_SEED_RULE)
    out_dir: Path = _opt(Path("results"), "Folder for results and heads_summary.csv.")
    memory_limit_mb: float | None = _opt(None, "Memory a fit may use [default: 80% of "
                                         "available memory].", min=0, min_open=True)
    pca: int = _opt(0, "Features that do not fit in memory: reduce to N PCA components "
                    "(IncrementalPCA on train) instead of streaming an SGD head.", min=0)
    solver: str = _opt("auto", "Who fits linear, logistic and svm: torch fits each head's "
                       "whole grid in one pass (CUDA when present, else the CPU threads); "
                       "sklearn one grid point at a time (the reference); auto: torch on CUDA "
                       "from 5,000,000 fit cells (rows x features) on, else sklearn.",
                       choices=SOLVERS)
    wide_pca: int = _opt(256, "Wide features (over 8,192 columns and over 4x the train rows): "
                         "reduce to N PCA components fitted on train only, capped by the "
                         "train rows (0: fit the full width).", min=0)
    backend: str = _shared("backend")
    scheduler: str | None = _shared("scheduler")
    refit: bool = _opt(False, "Fit again even where OUT already holds a result made from the "
                       "same cache with the same settings (reused by default).")
    bootstrap: int = _shared("bootstrap")
    shots: tuple[int, ...] = _shared("shots")
    train_fraction: tuple[float, ...] = _shared("train_fraction")
    draws: int = _shared("draws")
    repeats: int = _shared("repeats")


@dataclass
class SubsetConfig:
    """The labelled train subsets of a label-efficiency curve (``finetune --shots``; for
    the heads these are fields of :class:`HeadsConfig`): every shot count and fraction,
    ``draws`` seeded draws each (:func:`featx.data.subsets.train_subsets`)."""

    shots: tuple[int, ...] = _shared("shots")
    train_fraction: tuple[float, ...] = _shared("train_fraction")
    draws: int = _shared("draws")


@dataclass
class RepeatConfig:
    """How often ``finetune`` repeats its run (``--repeats``; for fit-heads and compare it
    is a field of :class:`HeadsConfig` / :class:`CompareConfig`)."""

    repeats: int = _shared("repeats")


@dataclass
class ReportConfig:
    """What ``featx report`` computes besides the ranking: ``bootstrap`` resamples of the
    test images for every row's intervals and the paired tests against its group's best
    (0: the intervals stored in the results, no paired tests)."""

    bootstrap: int = _shared("bootstrap")


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
                         "only), both.", choices=FINETUNE_MODES)
    epochs: int = _opt(10, "Fine-tuning epochs.", min=1)
    weights: str = _shared("weights")
    image_size: int | None = _shared("image_size")
    batch_size: int = _shared("batch_size")
    workers: int | None = _shared("workers")
    device: str = _shared("device")
    precision: str = _shared("precision")
    seed: int = _shared("seed")
    class_weight: str | None = _opt(None, "Class weights for the heads.", choices=CLASS_WEIGHTS)
    loss: str = _opt("ce", "Fine-tuning loss: cross-entropy, class-weighted, focal.",
                     choices=LOSSES)
    lr: float = _opt(1e-3, "Fine-tuning learning rate.", min=0, min_open=True,
                     problem="must be a positive number, e.g. 1e-3.")
    optimizer: str = _opt("sgd", "Fine-tuning optimizer.", choices=OPTIMIZERS)
    jobs: int = _opt(1, "Parallel head fits (the local cluster's workers with dask/ray).", min=1)
    backend: str = _shared("backend")
    scheduler: str | None = _shared("scheduler")
    cache_dir: Path = _opt(Path("cache"), "Where the feature caches go.")
    out: Path = _opt(Path("results/compare"), "Results folder (report in OUT/report).")
    overwrite: bool = _opt(False, "Replace caches made from other inputs.")
    progress: bool = _shared("progress")
    repeats: int = _shared("repeats")
