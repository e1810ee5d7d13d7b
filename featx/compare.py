"""The whole experiment in one call: extract -> heads -> fine-tuning -> report.

Every step skips work that is already done, so re-running after an interruption picks up
where it stopped: extraction reuses up-to-date caches and resumes ``.partial`` ones, heads
whose result JSON matches the current cache and settings are not refitted, fine-tuning runs
with a ``result.json`` are not retrained (an unfinished one resumes from ``last.pt``).

Under ``torchrun`` the extraction (shards, see :mod:`featx.extract.sharded`) and the fine-tuning runs
(DistributedDataParallel, see :func:`featx.finetune.finetune`) use every process; the heads
and the report run on rank 0 alone while the other processes wait.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featx import distributed
from featx.backbones import resolve_weights
from featx.cache import Cache
from featx.config import (
    FINETUNE_MODES,
    CompareConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadsConfig,
    check_settings,
)
from featx.data import DatasetSpec
from featx.extract import extract
from featx.features import PENULTIMATE, feature_name
from featx.finetune import data_from_cache, finetune, run_dir_name
from featx.head_current import current_head_result, head_request, select_for
from featx.results import finetune_result_path, head_result_path, read_result

# featx.heads (sklearn, scipy: about half of torch's import time) and featx.report (matplotlib)
# are imported only when there is something to fit or to draw: a re-run of a finished
# comparison then costs little more than importing torch.

__all__ = ["CompareConfig", "CompareRun", "FINETUNE_MODES", "run_compare"]

@dataclass
class CompareRun:
    """What :func:`run_compare` did; ``done``/``skipped`` list the steps in words."""

    caches: list[Path] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def _heads_up_to_date(cache: Cache, features: list[str], heads: list[str], out: Path,
                      cfg: CompareConfig, seed: int | None = None) -> list[str]:
    """Features of ``cache`` for which every head already has a result that ``fit-heads``,
    given :func:`_heads_config`, would reuse (:func:`~featx.head_current.current_head_result`;
    the memory plan and the grids are not compared, they would need sklearn)."""
    hcfg = _heads_config(cfg, heads, features, out, seed)
    has_val = "val" in cache.splits and len(cache.labels("val")) > 0
    select = select_for(hcfg, has_val)
    done = []
    for feature in features:
        if all(_head_is_current(cache, feature, head, select, hcfg) for head in heads):
            done.append(feature)
    return done


def _head_is_current(cache: Cache, feature: str, head: str, select: str,
                     hcfg: HeadsConfig) -> bool:
    """``head``'s own result is current, or the streamed sgd result that replaces it."""
    for fitted, streamed in ((head, False), ("sgd", True)):
        path = head_result_path(hcfg.out_dir, cache.path.stem, feature, fitted,
                                seed=hcfg.seed)
        request = head_request(hcfg, head=fitted, feature=feature, select_on=select,
                               streamed=streamed)
        if path.is_file():
            return current_head_result(path, cache.attrs, request) is not None
    return False


def _heads_config(cfg: CompareConfig, heads: list[str], features: list[str],
                  out: Path, seed: int | None = None) -> HeadsConfig:
    """The :class:`HeadsConfig` that compare passes to ``fit_heads`` for one cache (``seed``:
    a repeat's, default ``cfg.seed``)."""
    return HeadsConfig(heads=tuple(heads), features=tuple(features),
                       class_weight=cfg.class_weight, jobs=cfg.jobs,
                       seed=cfg.seed if seed is None else seed, out_dir=out,
                       backend=cfg.backend, scheduler=cfg.scheduler)


def run_compare(data: DatasetSpec, cfg: CompareConfig, *,
                log: Callable[[str], None] = print) -> CompareRun:
    """Extract each model, fit the heads on every feature, fine-tune, and write the report.

    Under ``torchrun`` every process shares the extraction (featx/extract/sharded.py) and the
    fine-tuning (DDP, featx/distributed.py); the heads and the report run once, on rank 0, while
    the others wait.
    """
    check_settings(cfg)  # the rules declared beside its fields (featx/config.py)
    heads = _head_names(cfg.heads)
    if cfg.backend != "loky" or cfg.scheduler:  # before any extraction; plain loky: no import
        from featx.heads import check_backend
        check_backend(cfg.backend, cfg.scheduler)
    out = Path(cfg.out)
    if not all(any(out.glob(head_result_path("", "*", "*", h).as_posix())) for h in heads):
        from featx.heads import parse_heads
        heads = parse_heads(cfg.heads)  # a fresh run: bad names fail before extracting
    env = distributed.init_process_group(cfg.device)
    say = log if env.is_main else (lambda message: None)
    run = CompareRun()

    for model in cfg.models:  # every rank: its shards of the images
        ex = extract(data, ExtractConfig(
            model=model, weights=cfg.weights, pools=cfg.pools, image_size=cfg.image_size,
            batch_size=cfg.batch_size, workers=cfg.workers, device=cfg.device,
            precision=cfg.precision, out_dir=cfg.cache_dir, overwrite=cfg.overwrite,
            seed=cfg.seed, progress=cfg.progress))
        (run.skipped if ex.status == "up-to-date" else run.done).append(
            f"extract {model}: {ex.status} ({ex.path})")
        say(f"extract {model}: {ex.status} -> {ex.path}")
        run.caches.append(ex.path)

    runs = distributed.run_on_main(lambda: _repeats(data, cfg, run.caches, say))
    done, skipped = distributed.run_on_main(lambda: _fit_heads(
        [(path, seed) for _, path, seed in runs], heads, cfg, out, log))
    run.done += done
    run.skipped += skipped

    for model, path, seed in runs:  # every rank: DDP under torchrun
        ft_data = distributed.run_on_main(lambda: data_from_cache(path))  # the heads' very files
        for freeze in FINETUNE_MODES[cfg.finetune]:
            fcfg = FinetuneConfig(
                model=model, weights=cfg.weights, freeze=freeze, epochs=cfg.epochs,
                batch_size=cfg.batch_size, optimizer=cfg.optimizer, lr=cfg.lr, loss=cfg.loss,
                image_size=cfg.image_size, precision=cfg.precision, device=cfg.device,
                workers=cfg.workers, seed=seed, out_dir=out, resume=True,
                progress=cfg.progress)
            run_dir = out / run_dir_name(ft_data, fcfg, resolve_weights(model, cfg.weights,
                                                                        seed=seed))
            if distributed.run_on_main(lambda: _finished(finetune_result_path(run_dir))):
                run.skipped.append(f"finetune {model} freeze={freeze}: done ({run_dir})")
                say(f"finetune {model} freeze={freeze}: up to date")
                continue
            res = finetune(ft_data, fcfg, log=log)
            run.done.append(f"finetune {model} freeze={freeze}: {res.run_dir}")

    run.report = distributed.run_on_main(lambda: _report(out, fresh=not run.done))
    return run


def _repeats(data: DatasetSpec, cfg: CompareConfig, caches: list[Path],
             say: Callable[[str], None]) -> list[tuple[str, Path, int]]:
    """``(model, cache, seed)`` of every repeat: with ``cfg.repeats`` K > 1, data featx split
    is split again with split seeds S+1, ..., S+K-1 (split views of each cache's rows:
    :func:`featx.cache.resplit`, no extraction), pre-split data gets seeds seed, ..., seed+K-1."""
    runs = [(m, p, cfg.seed) for m, p in zip(cfg.models, caches)]
    if cfg.repeats == 1:
        return runs
    if data.seed is None:
        say(f"repeats: {cfg.repeats} seeds {cfg.seed}..{cfg.seed + cfg.repeats - 1} (the data "
            f"came split, so its split stays)")
        return [(m, p, cfg.seed + r) for m, p, _ in runs for r in range(cfg.repeats)]
    from featx.cache import resplit
    say(f"repeats: {cfg.repeats} splits, split seeds {data.seed}..{data.seed + cfg.repeats - 1} "
        f"(split views of each cache's rows: no extraction)")
    out = []
    for m, p, seed in runs:
        out.append((m, p, seed))
        out += [(m, resplit(p, data.seed + r).path, seed) for r in range(1, cfg.repeats)]
    return out


def _report(out: Path, *, fresh: bool) -> dict:
    """The report, rewritten only when something was done or a result is newer than it."""
    report = _current_report(out) if fresh else None
    if report is None:
        from featx.report import write_report
        report = write_report(out, out / "report")
    return report


def _fit_heads(caches: list[tuple[Path, int]], heads: list[str], cfg: CompareConfig, out: Path,
               log: Callable[[str], None]) -> tuple[list[str], list[str]]:
    """Every head on every feature that lacks a current result; ``(done, skipped)`` lines.
    ``caches``: ``(cache, seed)`` of each repeat."""
    done, skipped, todo_by_cache = [], [], []
    for path, seed in caches:
        cache = Cache(path)
        # what this comparison asked for, even when the cache holds more pool sizes; a
        # feature stored once under another name (pool1 = penultimate) is fitted once
        features = [PENULTIMATE] + [feature_name(n) for n in cfg.pools]
        for feature in features:
            cache.check_feature(feature)
        features = list(dict.fromkeys(cache.aliases.get(f, f) for f in features))
        current = _heads_up_to_date(cache, features, heads, out, cfg, seed)
        todo = [f for f in features if f not in current]
        name = path.name + (f" seed {seed}" if seed != cfg.seed else "")
        if not todo:
            skipped.append(f"heads on {name}: all results current")
            log(f"heads on {name}: up to date")
        else:
            todo_by_cache.append((path, seed, todo))
    if todo_by_cache:  # one cluster (or loky pool) for every cache's heads
        from featx.heads import fit_heads, heads_backend, parse_heads
        heads = parse_heads(heads)
        with heads_backend(cfg.backend, scheduler=cfg.scheduler, jobs=cfg.jobs):
            for path, seed, todo in todo_by_cache:
                fit_heads([path], _heads_config(cfg, heads, todo, out, seed), log=log)
                done.append(f"heads on {path.name}"
                            + (f" seed {seed}" if seed != cfg.seed else "")
                            + f": {', '.join(todo)}")
    return done, skipped


def _head_names(heads) -> list[str]:
    """``--heads`` as names, unchecked (checking imports the head registry and sklearn)."""
    items = heads.split(",") if isinstance(heads, str) else list(heads)
    return list(dict.fromkeys(h.strip() for h in items if h and h.strip()))


def _current_report(out: Path) -> dict | None:
    """What :func:`~featx.report.write_report` would return, without drawing anything, when
    ``out/report/report.md`` (and .csv, .html) is newer than every file and folder of the results under ``out``
    (a result added, changed or removed since makes it stale)."""
    report = out / "report"
    md, csv, html = report / "report.md", report / "report.csv", report / "report.html"
    try:  # a report folder from before report.html existed is rewritten
        written = min(md.stat().st_mtime_ns, csv.stat().st_mtime_ns, html.stat().st_mtime_ns)
        newest = max([out.stat().st_mtime_ns] + [p.stat().st_mtime_ns for p in out.rglob("*")
                                                 if report not in p.parents and p != report])
    except OSError:
        return None
    if newest > written:
        return None
    from featx.report import format_table, load_results, rank_results
    return {"table": format_table(rank_results(load_results(out))), "markdown": md,
            "csv": csv, "html": html, "plot": sorted(report.rglob("*.png")), "note": []}



def _finished(path: Path) -> bool:
    try:
        read_result(path)
        return True
    except (OSError, ValueError):
        return False
