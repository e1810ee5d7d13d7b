"""The ``featx`` command: a thin click layer over the library modules.

Each command parses its options, makes one library call and prints the result. Library
errors become one-line ``Error: ...`` messages in :class:`_Group.invoke`, never tracebacks.
Every option can also be set from the environment as ``FEATX_<OPTION>`` (e.g.
``FEATX_BATCH_SIZE=64``; for ``featx extract`` also ``FEATX_EXTRACT_BATCH_SIZE``).
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from featx.config import (
    CompareConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadsConfig,
    RepeatConfig,
    ReportConfig,
    SubsetConfig,
    rule_of,
)

__all__ = ["main"]


class _Flags(dict):
    """Library parameter name -> the flag that sets it: ``--`` + the name in kebab-case,
    unless listed (featx.errors.ParameterError names parameters; this says them as flags)."""

    def __missing__(self, name: str) -> str:
        return "--" + name.replace("_", "-")


_FLAGS = _Flags(data_path="--data", split_fractions="--split", pools="--pool")


def _cli_terms(line: str) -> str:
    """A library line for the user (a :class:`featx.errors.Note`) with flags for parameters."""
    return line.render(_FLAGS) if hasattr(line, "render") else line


def _say(line: str) -> None:
    click.echo(_cli_terms(line), err=True)


class _Group(click.Group):
    """Turns the library's errors into one clear line and a non-zero exit."""

    def invoke(self, ctx):
        from featx.errors import user_error_message
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            raise click.ClickException(
                "interrupted. Finished work is kept; run the same command again to resume.")
        except Exception as exc:
            message = user_error_message(exc, _FLAGS)
            if message is None:
                raise
            raise click.ClickException(message) from None


class _EnvCommand(click.Command):
    """Lets every option fall back to ``FEATX_<OPTION>`` as well as click's auto prefix."""

    def make_context(self, info_name, args, parent=None, **extra):
        for param in self.params:
            if isinstance(param, click.Option) and param.envvar is None and param.name:
                # models_ / compile_ dodge Python names; the variable is FEATX_MODELS / _COMPILE
                param.envvar = f"FEATX_{param.name.upper().rstrip('_')}"
                param.show_envvar = True
        return super().make_context(info_name, args, parent=parent, **extra)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "auto_envvar_prefix": "FEATX",
                                           "show_default": True})
@click.version_option(package_name="featx")
def main():
    """featx: cache frozen backbone features once, fit many heads, compare with fine-tuning.

    \b
      featx extract --model resnet18 --data DIR --pool 1,2,4,8
      featx fit-heads cache/*.h5
      featx finetune --model resnet18 --split-from cache/....h5
      featx report results/
    """


# --- options shared by several commands ----------------------------------------------------

def _click_type(rule: dict) -> click.ParamType:
    """The click type that accepts what a field's declared rule accepts (featx.config):
    ``--help`` shows it, and a bad value fails before the library is called."""
    if "choices" in rule:
        return click.Choice(rule["choices"])
    kind = click.IntRange if rule["integer"] else click.FloatRange
    return kind(rule["min"], rule["max"], min_open=rule["min_open"])


class _FieldOption(click.Option):
    """A click option that sets the config field ``field`` (see :func:`_config_from_options`)."""

    def __init__(self, *args, field: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.field = field


def _option(config, name: str, *decls: str, **attrs):
    """A click option for the field ``name`` of ``config``, with the field's default, help
    and, from its declared rule, its type (a choice or a range).

    A tuple default becomes the comma-separated text the option takes, and ``None`` becomes
    ``"none"`` where that is one of the choices; ``decls`` default to ``--field-name``, and
    ``attrs`` (metavar, a command's own help or default) go to :func:`click.option`.
    """
    spec = config.__dataclass_fields__[name]
    rule = rule_of(config, name)
    if rule and not attrs.get("is_flag"):
        attrs.setdefault("type", _click_type(rule))
    default = spec.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default))
    elif default is None and "none" in rule.get("choices", ()):
        default = "none"
    attrs.setdefault("default", default)
    attrs.setdefault("help", spec.metadata.get("help"))
    return click.option(*(decls or (f"--{name.replace('_', '-')}",)), cls=_FieldOption,
                        field=name, **attrs)


def _config_from_options(config, **given):
    """A ``config`` built from the running command's options for its fields (those made by
    :func:`_option`), and ``given`` for the rest (the model, parsed pool sizes).

    Comma-separated text becomes a tuple, and ``"none"`` becomes ``None`` where the field's
    default is ``None``; a field the command has no option for keeps its default.
    """
    ctx = click.get_current_context()
    fields = config.__dataclass_fields__
    values = {}
    for param in ctx.command.params:
        name = getattr(param, "field", None)
        if name not in fields or name in given:
            continue
        value, default = ctx.params[param.name], fields[name].default
        if isinstance(default, tuple) and isinstance(value, str):
            value = tuple(v for v in value.split(",") if v)  # "" (an empty list) is ()
        elif default is None and value == "none" and "none" in rule_of(config, name).get(
                "choices", ()):
            value = None
        values[name] = value
    return config(**values, **given)


# numpy, sklearn and torch all take this range (featx.config.MAX_SEED)
_SEED = _click_type(rule_of(ExtractConfig, "seed"))


def data_options(f):
    """``--data``, ``--split``, ``--split-seed``, ``--seed``: the images, their split, the seed."""
    f = _option(ExtractConfig, "seed")(f)
    f = click.option("--split-seed", type=_SEED, default=0,
                     help="Seed of the split, for data that comes unsplit (class folders, a "
                     "CSV without a split column), 0..4294967295; other than 0 it is part of "
                     "the cache's name.")(f)
    f = click.option("--split", "split_fractions", default="0.7,0.15,0.15", metavar="TR,VA,TE",
                     help="Train/val/test fractions, used when the data has no split.")(f)
    f = click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path),
                     required=False, help="Folder (train/val/test or class folders) or CSV "
                     "manifest path,label[,split].")(f)
    return f


def model_options(f):
    """``--weights``, ``--image-size``, ``--device``, ``--precision``, ``--workers``."""
    # extract, finetune and compare share these fields, defaults included (tests/test_config.py)
    f = _option(ExtractConfig, "workers")(f)
    f = _option(ExtractConfig, "precision")(f)
    f = _option(ExtractConfig, "device")(f)
    f = _option(ExtractConfig, "image_size")(f)
    f = _option(ExtractConfig, "weights", metavar="imagenet|none|FILE")(f)
    return f


def backend_options(f):
    """``--backend``, ``--scheduler``: where head fits run (joblib backends)."""
    # not FEATX_SCHEDULER: finetune's --scheduler (the LR schedule) has that variable
    f = _option(HeadsConfig, "scheduler", "--scheduler", "scheduler_address",
                metavar="ADDRESS")(f)
    f = _option(HeadsConfig, "backend")(f)
    return f


def load_data_arg(data_path: Path | None, split_fractions: str, split_seed: int):
    from featx.data import load_dataset, parse_split_fractions
    if data_path is None:
        raise click.UsageError("--data PATH is required.")
    spec = load_dataset(data_path, split=parse_split_fractions(split_fractions), seed=split_seed)
    for note in spec.notes:
        click.echo(f"note: {note}", err=True)
    return spec


# --- featx models / weights ------------------------------------------------------------------

@main.command(cls=_EnvCommand)
@click.option("--all", "show_all", is_flag=True,
              help="Also list every timm model (use as --model timm:NAME).")
@click.option("--filter", "pattern", default=None, metavar="GLOB",
              help="Only names matching GLOB, timm's included, e.g. 'vit_*' or '*dinov2*'.")
@click.option("--layers", "layers_of", default=None, metavar="MODEL",
              help="List MODEL's layers for `extract --layers` instead: module names, their "
              "map (C x h x w at the model's input size), * = one of its stages.")
def models(show_all, pattern, layers_of):
    """List the backbones: feature sizes, input size, and whether ImageNet weights are here.

    torchvision models are listed by default; any timm model works as timm:NAME
    (--all or --filter list them, with whether timm's pretrained file is cached here).
    """
    import fnmatch
    if layers_of is not None:
        _list_layers(layers_of)
        return

    from featx.backbones import (
        describe_weights_availability,
        get_backbone,
        hub_checkpoint_path,
        list_backbones,
    )
    names = [n for n in list_backbones() if pattern is None or fnmatch.fnmatch(n, pattern)]
    if names:
        click.echo(f"{'model':<20} {'penultimate':>11} {'spatial C':>9} {'input':>5}  weights")
    for name in names:
        spec = get_backbone(name)
        found = describe_weights_availability(name)
        here = f"available ({found})" if found else f"missing ({hub_checkpoint_path(name).name})"
        click.echo(f"{name:<20} {spec.penultimate_dim:>11} {spec.spatial_channels:>9} "
                   f"{spec.default_image_size:>5}  {here}")
    if names:
        click.echo(f"\nweights folder: {hub_checkpoint_path(list_backbones()[0]).parent}")
    try:
        from featx.backbones import list_timm_models
        timm_names = list_timm_models(pattern) if (show_all or pattern) else list_timm_models()
    except Exception:  # timm not installed: the extra is optional
        click.echo("timm models: pip install 'featx[timm]' to use any timm model as timm:NAME.")
        return
    if not (show_all or pattern):
        click.echo(f"timm: {len(timm_names)} more models as --model timm:NAME; "
                   f"`featx models --all` or --filter 'vit_*' lists them.")
        return
    from featx.backbones import timm_cached_names
    cached = timm_cached_names(timm_names)
    if timm_names:
        click.echo(f"\ntimm models ({len(timm_names)}; * = pretrained file in the local cache):")
    for name in timm_names:
        click.echo(f"timm:{name}" + (" *" if name in cached else ""))
    if not names and not timm_names:
        raise click.ClickException(f"no model matches --filter {pattern!r}; try e.g. 'vit_*'.")


def _list_layers(model: str) -> None:
    from featx.backbones import get_backbone, list_layers
    spec = get_backbone(model)
    size = spec.default_image_size
    rows = list_layers(model)
    click.echo(f"{model} at {size} px: {len(rows)} layers (* = stage, `--layers stages`)")
    for name, (c, h, w), stage in rows:
        click.echo(f"{'*' if stage else ' '} {name:<40} {c:>5} x {h} x {w}")
    tokens = getattr(spec, "layout", "") == "tokens"
    extra = ", last4 (DINOv2 linear eval: last 4 class tokens + mean patch token)" \
        if tokens and len(spec.layer_stages) >= 4 else ""
    click.echo(f"stored per layer: LAYER.pool{{n}} for each --pool"
               + (", LAYER.cls (class token)" if tokens else "") + f"; also: stages{extra}.")


@main.group(cls=_Group)
def weights():
    """Manage pretrained weights for offline use."""


@weights.command("import", cls=_EnvCommand)
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", required=True, help="The backbone these weights are for.")
def weights_import(file, model):
    """Check that FILE loads into MODEL, then put it where torchvision looks."""
    from featx.backbones import import_weights
    target = import_weights(file, model)
    click.echo(f"{file} fits {model}; placed at {target}")


# --- featx extract / info --------------------------------------------------------------------

@main.command(cls=_EnvCommand)
@click.option("--model", "models_", multiple=True, required=True,
              help="Backbone name (repeatable, or comma-separated), or timm:NAME for any timm "
              "model. See `featx models`.")
@data_options
# the command stores penultimate only unless asked; the library's default is (1,)
@_option(ExtractConfig, "pools", "--pool", default="", metavar="N,N,...")
@_option(ExtractConfig, "layers", default="", metavar="NAMES|stages|last4")
@_option(ExtractConfig, "keep_map", is_flag=True)
@_option(ExtractConfig, "map_store")
@model_options
@_option(ExtractConfig, "batch_size")
@_option(ExtractConfig, "store")
@_option(ExtractConfig, "out_dir", "--out", type=click.Path(file_okay=False, path_type=Path))
@_option(ExtractConfig, "overwrite", is_flag=True)
@_option(ExtractConfig, "compile", "--compile/--no-compile", "compile_")
@_option(ExtractConfig, "engine")
@_option(ExtractConfig, "progress", "--progress/--no-progress")
def extract(models_, data_path, split_fractions, split_seed, pool, layers, **settings):
    """Run frozen backbones over the images once; write features to HDF5.

    Also runs as `torchrun --nproc-per-node N -m featx extract ...`: the processes share
    the images and the job writes the same single cache file (docs: Scaling out).
    """
    from featx.backbones import get_backbone
    from featx.config import ExtractConfig
    from featx.distributed import is_main_process
    from featx.extract import extract as run_extract
    from featx.extract import parse_pools
    names = [m for arg in models_ for m in arg.split(",") if m]
    for name in names:
        get_backbone(name)  # fail on a bad name before reading any data
    from featx.backbones import layer_plan, parse_layers
    pools = parse_pools(pool)
    layer_names = parse_layers(layers)
    for name in names:  # a bad layer name fails before reading any data, too
        if layer_names:
            layer_plan(name, layer_names, pools, settings.get("image_size"))
    data = load_data_arg(data_path, split_fractions, split_seed)
    main_process = is_main_process()  # under torchrun only rank 0 speaks for the whole job
    if main_process:
        click.echo(f"data: {data.root} ({data.layout}), classes {', '.join(data.classes)}; "
                   + ", ".join(f"{s} {len(v)}" for s, v in data.splits.items()), err=True)
    for name in names:
        cfg = _config_from_options(ExtractConfig, model=name, pools=pools, layers=layer_names)
        res = run_extract(data, cfg)
        for note in res.notes:
            _say(note)
        if res.status == "up-to-date":
            click.echo(f"{res.path}: up to date, nothing to do.", err=True)
        else:
            click.echo(f"{name}: {res.n_images} images in {res.seconds:.1f} s "
                       f"({res.images_per_s:.1f} images/s, {res.precision}"
                       + (f", {res.engine}" if res.engine not in ("", "torch") else "") + "), "
                       f"weights: {res.weights_source}"
                       + (" [resumed]" if res.status == "resumed" else ""), err=True)
            if res.n_skipped:
                click.echo(f"skipped {res.n_skipped} unreadable file(s):", err=True)
                for split, path, reason in res.skipped[:10]:
                    click.echo(f"  {split}/{path}: {reason}", err=True)
                if res.n_skipped > 10:
                    click.echo(f"  ... see `featx info {res.path}`", err=True)
        if main_process:
            click.echo(str(res.path))


@main.command(cls=_EnvCommand)
@click.argument("cache_file", type=click.Path(path_type=Path))
def info(cache_file):
    """Show a cache's provenance, splits, datasets and skipped files."""
    from featx.cache import Cache
    click.echo(Cache(cache_file).describe())


@main.command(cls=_EnvCommand)
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--split-seed", "split_seeds", type=_SEED, multiple=True, required=True,
              help="Seed of the new split (repeatable), 0..4294967295.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder for the views [default: the cache's].")
@click.option("--overwrite", is_flag=True,
              help="Replace a real cache of other inputs that has the view's name.")
def resplit(cache_file, split_seeds, out_dir, overwrite):
    """Split a cache's images again, without running the backbone: a split view per seed.

    Writes NAME_split{S}.h5 (the name `featx extract --split-seed S` gives that split's
    cache) holding the new file lists and an index into CACHE's rows; no feature is copied.
    Every command that takes a cache takes the view. Only for data featx split (class
    folders, a CSV without a split column); prints each view's path.
    """
    from featx.cache import resplit as run_resplit
    for seed in split_seeds:
        res = run_resplit(cache_file, seed, out_dir=out_dir, overwrite=overwrite)
        counts = ", ".join(f"{s} {sum(c)}" for s, c in res.counts.items())
        click.echo(f"split seed {seed}: {counts}"
                   + (" (up to date)" if res.status == "up-to-date" else ""), err=True)
        click.echo(str(res.path))


@main.command("pool", cls=_EnvCommand)
@click.argument("cache_file", type=click.Path(path_type=Path))
@click.option("--pool", "pool", required=True, metavar="N,N,...",
              help="Pool sizes to add to every map the cache kept (extract --keep-map).")
def pool_command(cache_file, pool):
    """Add pool sizes to CACHE_FILE from the spatial maps it kept, without the backbone."""
    from featx.extract import parse_pools, repool
    added = repool(cache_file, parse_pools(pool))
    click.echo(f"{cache_file}: added {', '.join(added)}" if added else
               f"{cache_file}: every pool size is there already, nothing to do.")


# --- commands added by later modules register below this line ---------------------------------

@main.command(cls=_EnvCommand)
@click.argument("results_dir", required=False, default=Path("results"),
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for report.md, report.csv, report.html and the plots [default: "
              "RESULTS_DIR/report].")
@_option(ReportConfig, "bootstrap", metavar="N")
def report(results_dir, out, bootstrap):
    """Rank every head and fine-tuning result under RESULTS_DIR [default: results].

    Reads every result JSON (recursively), ranks them per dataset and split by test
    balanced accuracy, and writes report.md, report.csv, a self-contained report.html
    (sortable tables, plots embedded) and PNG plots. Results scored on
    another split than the rest of their dataset are listed apart as not comparable.
    Every test metric gets a 95% bootstrap interval, and every row is tested against the
    best row of its group on the same images (docs/statistics.md).
    """
    from featx.report import write_report
    written = write_report(results_dir, out, config=_config_from_options(ReportConfig))
    if written.get("verdict"):
        click.echo(written["verdict"])
        click.echo()
    click.echo(written["table"])
    click.echo()
    for note in written["note"]:
        click.echo(f"note: {note}", err=True)
    click.echo(f"markdown: {written['markdown']}")
    click.echo(f"csv: {written['csv']}")
    click.echo(f"html: {written['html']}")
    for plot in written["plot"]:
        click.echo(f"plot: {plot}")


@main.command("fit-heads", cls=_EnvCommand)
@click.argument("caches", nargs=-1, required=True, type=click.Path(path_type=Path))
@_option(HeadsConfig, "heads", metavar="NAME,...")
@_option(HeadsConfig, "features", metavar="NAME,...|all")
@_option(HeadsConfig, "select")
@_option(HeadsConfig, "cv")
@_option(HeadsConfig, "class_weight")
@_option(HeadsConfig, "standardize", "--standardize/--no-standardize")
@_option(HeadsConfig, "pca", metavar="N")
@_option(HeadsConfig, "wide_pca", metavar="N")
@_option(HeadsConfig, "solver")
@_option(HeadsConfig, "memory_limit_mb")
# not HeadsConfig's 1: the command uses every core unless told
@_option(HeadsConfig, "jobs", default=None,
         help="Parallel fits, runs x grid points; with dask/ray and no --scheduler, the local "
         "cluster's workers [default: CPU cores].")
@backend_options
@_option(HeadsConfig, "seed")
@_option(HeadsConfig, "out_dir", "--out", type=click.Path(file_okay=False, path_type=Path))
@_option(HeadsConfig, "refit", is_flag=True)
@_option(HeadsConfig, "bootstrap", metavar="N")
@_option(HeadsConfig, "shots", metavar="K,K,...")
@_option(HeadsConfig, "train_fraction", metavar="F,F,...")
@_option(HeadsConfig, "draws")
@_option(HeadsConfig, "repeats")
def fit_heads(caches, jobs, out, **settings):
    """Fit classical heads on cached features; choose on val, score once on test.

    Writes OUT/{cache}/heads/{feature}__{head}.json and .skops per run, merges
    OUT/heads_summary.csv, and prints a table sorted by test balanced accuracy. A result
    already made from the same cache file with the same settings is reused, not refitted.

    \b
    --shots / --train-fraction: label efficiency, --draws seeded draws of each labelled
    subset of train (val and test untouched); --repeats K: K splits (split views, no
    extraction) or, for pre-split data, K seeds.
    """
    from featx.config import HeadsConfig
    from featx.heads import fit_heads as run_fit_heads
    from featx.heads import format_summary
    cfg = _config_from_options(HeadsConfig, jobs=jobs or os.cpu_count() or 1)
    run = run_fit_heads(caches, cfg, log=_say)
    click.echo(format_summary(run.rows))
    for matrix in run.matrices:
        click.echo("\n" + matrix)
    for plot in run.plots:
        click.echo(f"plot: {plot}", err=True)
    click.echo(f"{len(run.rows)} result(s) under {out}; summary: {run.summary_csv}", err=True)


@main.command(cls=_EnvCommand)
@click.option("--model", required=True,
              help="Backbone name, or timm:NAME for any timm model. See `featx models`.")
@data_options
@click.option("--split-from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Take the exact train/val/test files from this cache "
              "(instead of --data), so heads and fine-tuning score the same images.")
@model_options
@_option(FinetuneConfig, "freeze", metavar="none|backbone|STAGE")
@_option(FinetuneConfig, "cut", metavar="STAGE")
@click.option("--list-stages", "show_stages", is_flag=True,
              help="Print the values --freeze accepts for --model, then the stages --cut "
              "accepts with their output shapes, then exit.")
@_option(FinetuneConfig, "epochs")
@_option(FinetuneConfig, "batch_size")
@_option(FinetuneConfig, "optimizer")
@_option(FinetuneConfig, "lr")
@_option(FinetuneConfig, "backbone_lr_mult")
@_option(FinetuneConfig, "weight_decay")
@_option(FinetuneConfig, "scheduler")
@_option(FinetuneConfig, "loss")
@_option(FinetuneConfig, "focal_gamma")
@_option(FinetuneConfig, "augment", "--augment/--no-augment")
@_option(FinetuneConfig, "pool")
@_option(FinetuneConfig, "early_stop", metavar="N")
@_option(FinetuneConfig, "out_dir", "--out", type=click.Path(file_okay=False, path_type=Path))
@_option(FinetuneConfig, "resume", is_flag=True)
@_option(FinetuneConfig, "bootstrap", metavar="N")
@click.option("--allow-missing", is_flag=True,
              help="With --split-from: fine-tune even if some of the cache's images are gone "
              "(the result records the files used, so report marks it not comparable).")
@_option(FinetuneConfig, "progress", "--progress/--no-progress")
@_option(SubsetConfig, "shots", metavar="K,K,...")
@_option(SubsetConfig, "train_fraction", metavar="F,F,...")
@_option(SubsetConfig, "draws")
@_option(RepeatConfig, "repeats")
def finetune(model, data_path, split_fractions, split_seed, split_from, show_stages,
             allow_missing, **settings):
    """Fine-tune a backbone with a new head on the same split and metrics as the heads.

    Writes OUT/{dataset}_{model}_finetune_{settings}/ with best.pt, last.pt, history.csv,
    curves.png and result.json, and prints the result's path.

    \b
    Several GPUs or machines: start it with torchrun (DistributedDataParallel),
      torchrun --nproc-per-node 4 -m featx finetune ...
    --batch-size is then per process; only rank 0 prints and writes files.

    \b
    --shots / --train-fraction: one run per labelled subset and draw, the very images
    fit-heads draws with the same --seed; --repeats K: K splits (--split-from: split views
    of the cache; --data: split seeds S..S+K-1) or, for pre-split data, K seeds.
    """
    from dataclasses import replace

    from featx import distributed
    from featx.config import FinetuneConfig
    from featx.data.subsets import train_subsets
    from featx.finetune import (
        check_config,
        data_from_cache,
        data_from_spec,
        cut_stages,
        list_stages,
        repeat_sources,
        subset_data,
    )
    from featx.finetune import finetune as run_finetune
    if show_stages:
        for name in list_stages(model):
            click.echo(name)
        _echo_cut_stages(model, cut_stages(model))
        return
    cfg = _config_from_options(FinetuneConfig, model=model)
    check_config(cfg)  # bad settings fail before any image is read
    sub = _config_from_options(SubsetConfig)
    subsets = train_subsets(sub.shots, sub.train_fraction, sub.draws) or [None]
    repeats = _config_from_options(RepeatConfig).repeats
    if (data_path is None) == (split_from is None):
        raise click.ClickException("give exactly one of --data PATH or --split-from CACHE.")
    env = distributed.init_process_group(cfg.device)  # under torchrun: join the process group; else nothing
    # (split source, seed) of every repeat: split views of --split-from, split seeds of
    # --data, or seeds for pre-split data
    sources = distributed.run_on_main(lambda: repeat_sources(
        split_from if split_from is not None else data_path, repeats, cfg.seed,
        split_seed=split_seed, split_fractions=split_fractions,
        from_cache=split_from is not None))
    last = None
    for source, seed in sources:
        for subset in subsets:
            last = _finetune_one(source, split_from is not None, allow_missing, split_fractions,
                                 replace(cfg, seed=seed), subset, env, run_finetune,
                                 data_from_cache, data_from_spec, subset_data)
    if last is not None and env.is_main and (len(sources) > 1 or len(subsets) > 1):
        click.echo(f"{len(sources) * len(subsets)} fine-tuning runs under {cfg.out_dir}",
                   err=True)


def _echo_cut_stages(model: str, stages: list[str]) -> None:
    """The ``--cut`` part of ``finetune --list-stages``: each stage with its output shape."""
    from featx.backbones import get_backbone, list_layers
    if not stages:
        click.echo(f"\n--cut: not available for {model}")
        return
    size = get_backbone(model).default_image_size
    shapes = {name: shape for name, shape, _ in list_layers(model, size)}
    click.echo(f"\n--cut accepts (output C x h x w at {size} px):")
    for name in stages:
        click.echo(f"{name}  {'x'.join(map(str, shapes[name]))}")


def _finetune_one(source, from_cache, allow_missing, split_fractions, cfg, subset, env,
                  run_finetune, data_from_cache, data_from_spec, subset_data):
    """One fine-tuning run of ``featx finetune``: its data, the run, what it printed."""
    from featx import distributed
    # under torchrun rank 0 reads the split (and decodes every image once) for all ranks
    if from_cache:
        data = distributed.run_on_main(lambda: data_from_cache(source,
                                                               allow_missing=allow_missing))
        if data.info.get("missing_files") and env.is_main:
            click.echo(f"note: {data.info['missing_files']} image(s) of {source} are gone; "
                       f"fine-tuning without them (not comparable with the cache's heads)",
                       err=True)
    else:
        path, seed = source
        data = distributed.run_on_main(lambda: data_from_spec(
            load_data_arg(path, split_fractions, seed), workers=cfg.workers))
    if subset is not None:
        data = subset_data(data, subset, cfg.seed)
    if env.is_main:
        click.echo(f"data: {data.source}, classes {', '.join(data.classes)}; "
                   + ", ".join(f"{s} {len(v)}" for s, v in data.splits.items())
                   + (f"; {len(data.skipped)} unreadable file(s) left out" if data.skipped
                      else "")
                   + (f"; {env.world_size} processes ({env.backend}), global batch "
                      f"{cfg.batch_size * env.world_size}" if env.distributed else ""), err=True)
    try:
        res = run_finetune(data, cfg, log=_say)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted. best.pt and last.pt of the finished epochs are "
                                   "kept; add --resume to the same command to continue.")
    if not env.is_main:
        return res
    m, sel = res.result["metrics"], res.result["selection"]
    click.echo(f"best epoch {sel['best_epoch']} ({sel['criterion']}); {sel['scored_split']} "
               f"accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
               f"macro F1 {m['macro_f1']:.4f}; {res.result['timings']['total_s']:.1f} s",
               err=True)
    click.echo(str(res.result_path))
    return res

# --- featx predict / export -----------------------------------------------------------------

@main.command(cls=_EnvCommand)
@click.option("--head", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A fit-heads result JSON (its .skops must be beside it).")
@click.option("--finetuned", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A finetune result.json (its best.pt must be beside it).")
@click.option("--data", "data_paths", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Folder (with or without class folders), CSV manifest path[,label], or an "
              "image file; repeatable.")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("predictions.csv"), help="The predictions CSV.")
@click.option("--weights", default=None, metavar="FILE|imagenet|none",
              help="Where the backbone weights are now, if they moved; their sha256 must be "
              "the recorded one [default: as recorded].")
@click.option("--batch-size", type=click.IntRange(1), default=32)
@click.option("--device", default="auto", help="auto, cpu or cuda.")
@click.option("--precision", type=click.Choice(["recorded", "auto", "fp32", "bf16", "fp16"]),
              default="recorded", help="recorded: what the result was computed with.")
@_option(ExtractConfig, "engine", help="What runs the backbone of a --head result, as in "
         "extract (a fine-tuned network runs in torch).")
@click.option("--workers", type=click.IntRange(0), default=0,
              help="DataLoader worker processes for decoding.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def predict(head, finetuned, data_paths, images, out, weights, batch_size, device,
            precision, engine, workers, progress):
    """Apply a head (or a fine-tuned network) to new images; write predictions.csv.

    Runs the backbone, weights and transform recorded in the result (refusing when the
    weights or model differ), streams the images batch by batch, and writes OUT with
    path, predicted, [label,] and one prob_CLASS or score_CLASS column per class.
    Unreadable files are skipped and listed in OUT's _skipped.csv; when every image has a
    label (class folders, a label column) the metrics go to OUT's _metrics.json.

    \b
      featx predict --head results/C/heads/pool2__logistic.json --data new_images/
      featx predict --finetuned results/RUN/result.json new/*.png --out new.csv
    """
    from featx.apply import predict as run_predict
    if (head is None) == (finetuned is None):
        raise click.UsageError("give exactly one of --head RESULT.json or --finetuned "
                               "RESULT.json.")
    inputs = list(data_paths) + list(images)
    if not inputs:
        raise click.UsageError("give the images: --data FOLDER|MANIFEST.csv or image files.")
    run = run_predict(head or finetuned, inputs, out, expect="head" if head else "finetune",
                      weights=weights, device=device, precision=precision, engine=engine,
                      batch_size=batch_size, workers=workers, progress=progress,
                      log=_say)
    click.echo(f"{run.n_images} image(s) predicted in {run.seconds:.1f} s", err=True)
    if run.skipped:
        click.echo(f"skipped {len(run.skipped)} unreadable file(s), listed in "
                   f"{run.skipped_csv}:", err=True)
        for path, reason in run.skipped[:10]:
            click.echo(f"  {path}: {reason}", err=True)
    if run.metrics is not None:
        m = run.metrics
        auc = "-" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
        click.echo(f"accuracy {m['accuracy']:.4f}, balanced {m['balanced_accuracy']:.4f}, "
                   f"macro F1 {m['macro_f1']:.4f}, ROC-AUC {auc} on {m['n']} labelled "
                   f"image(s); metrics: {run.metrics_json}", err=True)
    click.echo(str(run.out))


@main.command(cls=_EnvCommand)
@click.argument("result", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The .pt2 file [default: RESULT with the suffix .pt2].")
@click.option("--weights", default=None, metavar="FILE|imagenet|none",
              help="Where the backbone weights are now, if they moved; their sha256 must be "
              "the recorded one [default: as recorded].")
def export(result, out, weights):
    """Save RESULT as one torch.export program: backbone + pooling + head (.pt2).

    Input: a uint8 RGB batch (N, 3, H, W), resized and center-cropped as recorded (no
    normalisation: the program does it). Output: (N, classes) probabilities, or decision
    scores for ridge/SVM heads; argmax is the predicted class. Linear heads are folded with
    their scaler into one Linear; MLP heads become torch layers; knn and rbf are refused.
    Load with torch.export.load(PATH).module().
    """
    from featx.apply import export_result
    path, info = export_result(result, out, weights=weights)
    shape = "x".join(str(v) for v in info["input"]["shape"])
    click.echo(f"input uint8 {shape} ({info['input']['preprocess']}); output "
               f"{info['output']['meaning']} for {', '.join(info['classes'])}", err=True)
    click.echo(str(path))


# --- featx compare / demo ----------------------------------------------------------------------

def _print_compare(run) -> None:
    for line in run.skipped:
        click.echo(f"reused: {line}", err=True)
    report = run.report
    if report.get("table"):
        click.echo(report["table"])
    for key, value in report.items():
        if key != "table" and isinstance(value, (str, Path)):
            click.echo(f"{key}: {value}")
        elif key != "table" and isinstance(value, (list, tuple)):
            for v in value:
                click.echo(f"{key}: {v}")


@main.command(cls=_EnvCommand)
@data_options
@click.option("--models", "models_", required=True, metavar="NAME,NAME",
              help="Backbones to compare, comma-separated. See `featx models`.")
@_option(CompareConfig, "pools", "--pool", metavar="N,N,...")
@_option(CompareConfig, "heads", metavar="NAME,...")
@_option(CompareConfig, "finetune", "--finetune", "finetune_mode")
@_option(CompareConfig, "epochs")
@_option(CompareConfig, "lr")
@_option(CompareConfig, "optimizer")
@_option(CompareConfig, "loss")
@_option(CompareConfig, "class_weight")
@model_options
@_option(CompareConfig, "batch_size")
@_option(CompareConfig, "jobs")
@backend_options
@_option(CompareConfig, "cache_dir", type=click.Path(file_okay=False, path_type=Path))
@_option(CompareConfig, "out", type=click.Path(file_okay=False, path_type=Path))
@_option(CompareConfig, "overwrite", is_flag=True)
@_option(CompareConfig, "progress", "--progress/--no-progress")
@_option(CompareConfig, "repeats")
def compare(data_path, split_fractions, split_seed, models_, pool, heads, device, **settings):
    """Run the whole experiment: extract, heads on every feature, fine-tune, report.

    Work already done (an up-to-date cache, current head results, finished fine-tuning
    runs) is reused, so running it again after an interruption picks up where it stopped.

    \b
    Under torchrun the fine-tuning runs use every process (DDP; --batch-size per process);
    extraction, heads and the report run on rank 0 while the others wait.
    """
    from featx import distributed
    from featx.backbones import get_backbone
    from featx.compare import run_compare
    from featx.config import CompareConfig
    from featx.extract import parse_pools
    models = tuple(m for m in models_.split(",") if m)
    for name in models:
        get_backbone(name)
    env = distributed.init_process_group(device)
    data = distributed.run_on_main(lambda: load_data_arg(data_path, split_fractions, split_seed))
    cfg = _config_from_options(CompareConfig, models=models, pools=parse_pools(pool),
                               heads=tuple(h for h in heads.split(",") if h))
    run = run_compare(data, cfg, log=_say)
    if env.is_main:
        _print_compare(run)


@main.command(cls=_EnvCommand)
@click.option("--quick", is_flag=True,
              help="Smallest settings (3 digits x 20 images, 1 epoch): under a minute.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Fine-tuning epochs [default: 3, quick: 1].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("results/demo"), help="Results folder.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("cache"), help="Where the digits images and caches go.")
@click.option("--progress/--no-progress", default=True)
def demo(quick, epochs, out, cache_dir, progress):
    """Run `compare` on scikit-learn's digits, written once as PNG files: no download.

    mobilenet_v2 at 64 px, pools 1/2, four heads, fine-tuning of the head only and of the
    whole network. Uses ImageNet weights when available offline, random weights otherwise.
    """
    from featx.compare import run_compare
    from featx.config import CompareConfig
    from featx.data import load_dataset, write_digits_dataset
    from featx.demo import ensure_demo_weights
    weights, why = ensure_demo_weights("mobilenet_v2")
    click.echo(f"demo: {why}", err=True)
    if quick:
        root = write_digits_dataset(cache_dir / "demo-digits-quick", per_class=20, size=32,
                                    classes=(0, 1, 2))
        cfg = CompareConfig(models=("mobilenet_v2",), pools=(1, 2), heads=("logistic", "linear"),
                            finetune="backbone", epochs=epochs or 1, weights=weights,
                            image_size=32, batch_size=16, workers=0, cache_dir=cache_dir,
                            out=out, progress=progress)
    else:
        root = write_digits_dataset(cache_dir / "demo-digits", size=32)
        # mobilenet_v2's last map is 2x2 at 64 px: pool 4 would only repeat its values, and
        # 4x the features made the SVM grid alone take minutes
        cfg = CompareConfig(models=("mobilenet_v2",), pools=(1, 2), finetune="both",
                            epochs=epochs or 3, weights=weights, image_size=64,
                            batch_size=32, lr=0.01, cache_dir=cache_dir, out=out,
                            progress=progress)
    data = load_dataset(root, split=(0.6, 0.2, 0.2), seed=0)
    click.echo(f"demo: {len(data.classes)} digit classes, "
               + ", ".join(f"{s} {len(v)}" for s, v in data.splits.items())
               + f" images in {root}", err=True)
    run = run_compare(data, cfg, log=_say)
    _print_compare(run)
    if weights == "none":
        click.echo("note: random weights - these numbers show the machinery, not transfer.")


if __name__ == "__main__":
    main()
