"""The ``featx`` command: a thin click layer over the library modules.

Each command parses its options, makes one library call and prints the result. Library
errors become one-line ``Error: ...`` messages in :class:`_Group.invoke`, never tracebacks.
Every option can also be set from the environment as ``FEATX_<OPTION>`` (e.g.
``FEATX_BATCH_SIZE=64``; for ``featx extract`` also ``FEATX_EXTRACT_BATCH_SIZE``).
"""
from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import click

__all__ = ["main"]


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
            message = user_error_message(exc)
            if message is None:
                raise
            raise click.ClickException(message) from None


class _EnvCommand(click.Command):
    """Lets every option fall back to ``FEATX_<OPTION>`` as well as click's auto prefix."""

    def make_context(self, info_name, args, parent=None, **extra):
        for param in self.params:
            if isinstance(param, click.Option) and param.envvar is None and param.name:
                param.envvar = f"FEATX_{param.name.upper()}"
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

def data_options(f):
    """``--data``, ``--split``, ``--seed``: where the images are and how they are split."""
    f = click.option("--seed", type=int, default=0, help="Seed of the split and random init.")(f)
    f = click.option("--split", "split_fractions", default="0.7,0.15,0.15", metavar="TR,VA,TE",
                     help="Train/val/test fractions, used when the data has no split.")(f)
    f = click.option("--data", "data_path", type=click.Path(exists=True, path_type=Path),
                     required=False, help="Folder (train/val/test or class folders) or CSV "
                     "manifest path,label[,split].")(f)
    return f


def model_options(f):
    """``--weights``, ``--image-size``, ``--device``, ``--precision``, ``--workers``."""
    f = click.option("--workers", type=int, default=None,
                     help="DataLoader worker processes [default: CPU cores, at most 8].")(f)
    f = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                     default="auto", help="auto: bf16/fp16 on GPU, fp32 on CPU.")(f)
    f = click.option("--device", default="auto", help="auto, cpu or cuda.")(f)
    f = click.option("--image-size", type=click.IntRange(16, 2048), default=None,
                     help="Crop size in pixels; resize scaled to match [default: the "
                     "weights' own, usually 224].")(f)
    f = click.option("--weights", default="imagenet", metavar="imagenet|none|FILE",
                     help="torchvision ImageNet weights (hub cache), random init, or a .pth "
                     "state dict.")(f)
    return f


def load_data_arg(data_path: Path | None, split_fractions: str, seed: int):
    from featx.data import load_dataset, parse_split_fractions
    if data_path is None:
        raise click.UsageError("--data PATH is required.")
    spec = load_dataset(data_path, split=parse_split_fractions(split_fractions), seed=seed)
    for note in spec.notes:
        click.echo(f"note: {note}", err=True)
    return spec


# --- featx models / weights ------------------------------------------------------------------

@main.command(cls=_EnvCommand)
def models():
    """List the backbones: feature sizes, input size, and whether ImageNet weights are here."""
    from featx.backbones import (describe_weights_availability, get_backbone,
                                 hub_checkpoint_path, list_backbones)
    click.echo(f"{'model':<20} {'penultimate':>11} {'spatial C':>9} {'input':>5}  weights")
    for name in list_backbones():
        spec = get_backbone(name)
        found = describe_weights_availability(name)
        here = f"available ({found})" if found else f"missing ({hub_checkpoint_path(name).name})"
        click.echo(f"{name:<20} {spec.penultimate_dim:>11} {spec.spatial_channels:>9} "
                   f"{spec.default_image_size:>5}  {here}")
    click.echo(f"\nweights folder: {hub_checkpoint_path(list_backbones()[0]).parent}")


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
              help="Backbone name (repeatable, or comma-separated). See `featx models`.")
@data_options
@click.option("--pool", default="", metavar="N,N,...",
              help="AdaptiveAvgPool2d sizes to store besides penultimate, e.g. 1,2,4,8.")
@model_options
@click.option("--batch-size", type=click.IntRange(1), default=32)
@click.option("--store", type=click.Choice(["float32", "float16"]), default="float32",
              help="dtype of the stored features.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("cache"),
              help="Folder for the cache files.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made from other inputs.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def extract(models_, data_path, split_fractions, seed, pool, weights, image_size, device,
            precision, workers, batch_size, store, out, overwrite, progress):
    """Run frozen backbones over the images once; write features to HDF5."""
    from featx.backbones import get_backbone
    from featx.extract import ExtractConfig, extract as run_extract, parse_pools
    names = [m for arg in models_ for m in arg.split(",") if m]
    for name in names:
        get_backbone(name)  # fail on a bad name before reading any data
    pools = parse_pools(pool)
    data = load_data_arg(data_path, split_fractions, seed)
    click.echo(f"data: {data.root} ({data.layout}), classes {', '.join(data.classes)}; "
               + ", ".join(f"{s} {len(v)}" for s, v in data.splits.items()), err=True)
    for name in names:
        cfg = ExtractConfig(model=name, weights=weights, pools=pools, image_size=image_size,
                            batch_size=batch_size, workers=workers, device=device,
                            precision=precision, store=store, out_dir=out,
                            overwrite=overwrite, seed=seed, progress=progress)
        res = run_extract(data, cfg)
        if res.status == "up-to-date":
            click.echo(f"{res.path}: up to date, nothing to do.", err=True)
        else:
            click.echo(f"{name}: {res.n_images} images in {res.seconds:.1f} s "
                       f"({res.images_per_s:.1f} images/s), weights: {res.weights_source}"
                       + (" [resumed]" if res.status == "resumed" else ""), err=True)
            if res.n_skipped:
                click.echo(f"skipped {res.n_skipped} unreadable file(s):", err=True)
                for split, path, reason in res.skipped[:10]:
                    click.echo(f"  {split}/{path}: {reason}", err=True)
                if res.n_skipped > 10:
                    click.echo(f"  ... see `featx info {res.path}`", err=True)
        click.echo(str(res.path))


@main.command(cls=_EnvCommand)
@click.argument("cache_file", type=click.Path(path_type=Path))
def info(cache_file):
    """Show a cache's provenance, splits, datasets and skipped files."""
    from featx.cache import Cache
    click.echo(Cache(cache_file).describe())


# --- commands added by later modules register below this line ---------------------------------


if __name__ == "__main__":
    main()
