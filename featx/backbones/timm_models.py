"""timm's models as featx backbones: ``--model timm:NAME`` for any name ``timm.list_models`` knows.

:mod:`featx.backbones.registry` hands every ``timm:`` name to :func:`timm_spec` (registered below);
this module holds what only timm models need, in timm's own terms:

* ``penultimate`` is ``forward_head(forward_features(x), pre_logits=True)``, exactly as timm
  computes it (for a ViT that is timm's head pooling: the class token, or the token mean for
  ``global_pool='avg'`` models);
* the spatial map is ``forward_features(x)``: NCHW for CNNs, NHWC turned to NCHW for models
  that say ``output_fmt='NHWC'`` (Swin, ...), and for ViT-style models (tokens ``(B, T, C)``)
  the patch tokens, with the ``num_prefix_tokens`` class/register/distillation tokens
  dropped, laid back on their ``(H/p, W/p)`` grid. ``pool{n}`` is AdaptiveAvgPool2d(n) of that
  map, so for a ViT ``pool1`` is the mean of the patch tokens, which is *not* ``penultimate``;
* stages for ``--freeze`` are timm's own coarse parameter groups (``model.group_matcher``,
  the groups timm uses for layer-wise learning-rate decay), in forward order;
* the eval transform is timm's resolved data config (``resolve_data_config``), recorded in
  the cache's provenance;
* weights: ``none`` (seeded random init), a timm state dict / checkpoint file, or timm's
  pretrained file when it is already in the Hugging Face hub cache (or torch's hub cache for
  the few models hosted by URL).

timm is an optional dependency (``pip install 'featx[timm]'``), imported only when a
``timm:`` model is asked for.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from featx.backbones.registry import UnknownModelError, WeightsError, register_source
from featx.backbones.state_dicts import check_state_dict
from featx.data import DataParameterError
from featx.data.images import TransformSpec
from featx.errors import FeatxError

__all__ = ["PREFIX", "TimmSpec", "timm_spec", "list_timm_models", "timm_cached_names",
           "timm_pretrained_file", "load_timm_state", "build_timm_model", "timm_transform"]

PREFIX = "timm:"


def _timm():
    try:
        import timm
    except ImportError:
        raise UnknownModelError("timm models need the timm package: pip install 'featx[timm]' "
                                "(or pip install timm).") from None
    return timm


@dataclass(frozen=True)
class TimmSpec:
    """One timm model as a featx registry entry (same attributes as ``BackboneSpec``).

    ``layout`` is what ``forward_features`` returns: ``"NCHW"``, ``"NHWC"`` or ``"tokens"``
    (``(B, T, C)`` with ``num_prefix_tokens`` leading non-patch tokens). ``data_config`` is
    timm's resolved data config at the model's default size; ``stage_params`` maps each
    ``--freeze`` stage to its parameter names.
    """

    name: str
    timm_name: str
    penultimate_dim: int
    spatial_channels: int
    classifier: str
    layout: str
    data_config: dict
    pretrained_cfg: dict
    stages: tuple[str, ...]
    stage_params: dict = field(default_factory=dict)
    channels_last: bool = False
    builder = None
    weights_enum = None

    @property
    def default_image_size(self) -> int:
        return int(self.data_config["input_size"][-1])

    # --- what the wrappers call --------------------------------------------------------------
    @staticmethod
    def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_features(x)

    @staticmethod
    def head(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
        return model.forward_head(feats, pre_logits=True)

    def spatial(self, model: nn.Module, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``forward_features`` output -> ``(B, C, h, w)`` map (input ``x`` gives the grid)."""
        if self.layout == "NCHW":
            return feats
        if self.layout == "NHWC":
            return feats.permute(0, 3, 1, 2)
        prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        tokens = feats[:, prefix:]
        h, w = _token_grid(model, tokens.shape[1], x.shape[-2:], self.name)
        # (B, h*w, C) row-major patches -> (B, C, h, w), the layout timm itself uses
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def stage_parameter_names(self, model: nn.Module, stage: str) -> list[str]:
        if stage == "":
            return [n for n, _ in model.named_parameters()]
        own = {n for n, _ in model.named_parameters()}
        return [n for n in self.stage_params[stage] if n in own]

    def drop_classifier(self, model: nn.Module) -> None:
        model.reset_classifier(0)


def _token_grid(model: nn.Module, n_tokens: int, hw, name: str) -> tuple[int, int]:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        h, w = int(hw[0]) // ph, int(hw[1]) // pw
        if h * w == n_tokens:
            return h, w
    side = math.isqrt(n_tokens)
    if side * side == n_tokens:
        return side, side
    raise FeatxError(f"{name}: cannot lay its {n_tokens} patch tokens on a grid for pool{{n}}; "
                     f"use only penultimate features (no --pool) with this model.")


# --- the spec -------------------------------------------------------------------------------

def list_timm_models(pattern: str | None = None) -> list[str]:
    """timm architecture names (without the ``timm:`` prefix), filtered by a glob pattern."""
    timm = _timm()
    names = timm.list_models()
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern.removeprefix(PREFIX))]
    return names


def _check_name(timm_name: str) -> None:
    timm = _timm()
    arch, _, tag = timm_name.partition(".")
    if arch and timm.is_model(arch):
        if tag and timm_name not in timm.list_pretrained(f"{arch}.*"):
            tags = ", ".join(n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*"))
            raise UnknownModelError(f"timm has no pretrained tag {tag!r} for {arch}; its tags: "
                                    f"{tags or 'none'} (or give timm:{arch} for the default).")
        return
    close = difflib.get_close_matches(timm_name, timm.list_models(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
    raise UnknownModelError(f"unknown timm model {timm_name!r}.{hint} Run `featx models --filter "
                            f"'PATTERN*'` to list timm's names.")


def _create(timm_name: str, **kwargs) -> nn.Module:
    return _timm().create_model(timm_name, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=64)
def timm_spec(name: str) -> TimmSpec:
    """The registry entry for ``timm:NAME``, read off a model built on the meta device."""
    timm_name = name.removeprefix(PREFIX)
    _check_name(timm_name)
    timm = _timm()
    try:  # the meta device allocates nothing: a ViT-g spec costs milliseconds
        with torch.device("meta"):
            model = _create(timm_name)
        meta = True
    except Exception:
        model, meta = _create(timm_name), False
    data_config = dict(timm.data.resolve_data_config({}, model=model))
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    classifier = pretrained_cfg.get("classifier") or "head"
    if isinstance(classifier, (tuple, list)):
        classifier = classifier[0]
    layout, channels, pen_dim = _probe_outputs(model, data_config, meta)
    model.reset_classifier(0)
    stage_params = _stage_groups(model)
    return TimmSpec(name=PREFIX + timm_name, timm_name=timm_name, penultimate_dim=pen_dim,
                    spatial_channels=channels, classifier=classifier, layout=layout,
                    data_config=data_config, pretrained_cfg=pretrained_cfg,
                    stages=tuple(stage_params), stage_params=stage_params,
                    channels_last=layout == "NCHW")


def _probe_outputs(model: nn.Module, data_config: dict, meta: bool) -> tuple[str, int, int]:
    """(layout, spatial channels, penultimate dim) from one forward at the default size."""
    device = "meta" if meta else "cpu"
    x = torch.zeros(1, *data_config["input_size"], device=device)
    try:
        with torch.no_grad():
            feats = model.eval().forward_features(x)
            pen = model.forward_head(feats, pre_logits=True)
        pen_dim = int(pen.shape[-1])
        if feats.ndim == 3:
            return "tokens", int(feats.shape[-1]), pen_dim
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            return "NHWC", int(feats.shape[-1]), pen_dim
        return "NCHW", int(feats.shape[1]), pen_dim
    except Exception:  # a model the meta device cannot run: timm's own attributes say it
        pen_dim = int(getattr(model, "head_hidden_size", model.num_features))
        if hasattr(model, "num_prefix_tokens"):
            return "tokens", int(model.num_features), pen_dim
        layout = "NHWC" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "NCHW"
        return layout, int(model.num_features), pen_dim


def _stage_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """timm's coarse parameter groups, in forward order, named for the modules they hold."""
    from timm.models import group_parameters
    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
    except Exception:  # no group_matcher: one stage per top-level child
        groups = {}
        for n, _ in model.named_parameters():
            groups.setdefault(n.split(".")[0], []).append(n)
    named: dict[str, tuple[str, ...]] = {}
    for i, params in enumerate(groups.values()):
        owners = list(dict.fromkeys(_owner(p) for p in params))
        common = os.path.commonprefix([p.split(".")[:-1] for p in params])
        if common:  # layer1.0.x, layer1.1.x -> layer1; stages.0.blocks.0.x alone -> stages.0
            label = ".".join(common[:len(owners[0].split("."))])
        else:
            label = "stem" if i == 0 else "+".join(owners)
        if label in named:
            label = f"{label}#{i}"
        named[label] = tuple(params)
    return named


def _owner(param: str) -> str:
    # blocks.3.attn.qkv.weight -> blocks.3; stages.1.blocks.0.x -> stages.1; cls_token -> cls_token
    parts = param.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0] if len(parts) > 1 else param


# --- transform ------------------------------------------------------------------------------

def timm_transform(spec: TimmSpec, image_size: int | None = None):
    """featx's :class:`~featx.data.images.TransformSpec` for timm's eval transform, and the config.

    Same operations as ``timm.data.create_transform(**config)``: resize the short side to
    ``floor(size / crop_pct)``, center crop ``size``, normalise. ``image_size`` replaces the
    crop size as ``resolve_data_config({'input_size': (3, N, N)})`` would.
    """
    cfg = dict(spec.data_config)
    if image_size is not None:
        if image_size < 16:
            raise DataParameterError("image_size", image_size, "is too small; use at least "
                                     "16.", sep=" ")
        cfg["input_size"] = (3, image_size, image_size)
    _, h, w = cfg["input_size"]
    mode = cfg.get("crop_mode") or "center"
    if h != w or mode != "center":
        raise FeatxError(f"{spec.name}: timm's eval transform for it is {mode!r} crop at "
                         f"{h}x{w}; featx reproduces square center crops only (most timm "
                         f"models); give {{image_size}} N for a square one, or pick another model.")
    crop_pct = cfg.get("crop_pct") or 0.875
    resize = math.floor(h / crop_pct)
    return TransformSpec(resize, int(h), tuple(float(v) for v in cfg["mean"]),
                         tuple(float(v) for v in cfg["std"]), str(cfg["interpolation"])), cfg


# --- weights --------------------------------------------------------------------------------

def _hf_cache_dir() -> Path:
    # read at call time (huggingface_hub reads it once at import) so HF_HOME set later counts
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface")
    return Path(home) / "hub"


def _hf_candidates(cfg: dict) -> tuple[str | None, list[str]]:
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None, []
    wanted = cfg.get("hf_hub_filename") or "pytorch_model.bin"
    # timm loads model.safetensors first when the repo has one, as its hub loader does
    names = ["model.safetensors", wanted] if wanted == "pytorch_model.bin" else [wanted]
    return repo.split("@")[0], names


def timm_pretrained_file(spec: TimmSpec, *, download: bool = False) -> Path:
    """timm's pretrained file for ``spec`` in the local hub cache.

    Raises :class:`~featx.backbones.WeightsError` naming the repo and file it expects when
    it is not there and ``download`` is false (offline) or the download fails.
    """
    cfg = spec.pretrained_cfg
    repo, names = _hf_candidates(cfg)
    url = cfg.get("url") or ""
    cache = _hf_cache_dir()
    if repo:
        from huggingface_hub import try_to_load_from_cache
        for fname in names:
            found = try_to_load_from_cache(repo, fname, cache_dir=cache)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
        where = (f"timm expects {names[0]} from the Hugging Face repo {repo} in {cache} (set "
                 f"HF_HOME or HF_HUB_CACHE to move it)")
    elif url:
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if target.is_file():
            return target
        where = f"timm expects {target.name} in {target.parent} (from {url})"
    else:
        raise WeightsError(f"timm has no pretrained weights for {spec.name}; use --weights none "
                           f"(random init) or --weights FILE.")
    message = (f"ImageNet weights for {spec.name} are not available offline: {where}. Fetch "
               f"them where you are online (python -c \"import timm; timm.create_model("
               f"'{spec.timm_name}', pretrained=True)\") and copy the cache, or use --weights "
               f"FILE (a timm state dict) or --weights none (random init).")
    if not download:
        raise WeightsError(message)
    try:
        if repo:
            from huggingface_hub import hf_hub_download
            for fname in names:
                try:
                    return Path(hf_hub_download(repo, fname, cache_dir=cache))
                except Exception:
                    if fname == names[-1]:
                        raise
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(target), progress=True)
        return target
    except Exception as exc:  # network errors come in many types; all mean "not available"
        raise WeightsError(f"{message} (download failed: {type(exc).__name__})") from None


def timm_cached_names(names: list[str]) -> set[str]:
    """Those of ``names`` whose default pretrained file is in the local cache (no network)."""
    timm = _timm()
    cache, hub = _hf_cache_dir(), Path(torch.hub.get_dir()) / "checkpoints"
    found = set()
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None:
            continue
        cfg = cfg.to_dict()
        repo, _ = _hf_candidates(cfg)
        if repo and (cache / f"models--{repo.replace('/', '--')}").is_dir():
            try:
                timm_pretrained_file(timm_spec(PREFIX + name))
                found.add(name)
            except Exception:
                pass
        elif not repo and cfg.get("url") and (hub / os.path.basename(cfg["url"])).is_file():
            found.add(name)
    return found


def load_timm_state(path: str) -> dict:
    """A timm state dict from ``path``: a bare state dict, safetensors, or a checkpoint dict
    with ``state_dict`` / ``model`` (timm's train.py / featx checkpoints), ``module.`` removed.
    """
    from timm.models import load_state_dict
    try:
        # use_ema=False: the weights that were trained, not timm's EMA copy
        state = load_state_dict(str(path), use_ema=False)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}".splitlines()[0]) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise WeightsError(f"{path} does not hold a timm state dict.")
    return state


def _num_classes_in(spec: TimmSpec, state: dict) -> int:
    w = state.get(f"{spec.classifier}.weight")
    return int(w.shape[0]) if w is not None and w.ndim >= 1 else 0


def build_timm_model(spec: TimmSpec, path: str | None, *, seed: int = 0,
                     image_size: int | None = None) -> nn.Module:
    """Build ``spec``'s model (random init from ``seed``), load ``path`` if given, eval mode.

    ViT-style models with a fixed input size are built for ``image_size`` (their position
    embedding resampled by timm's checkpoint filter on load, as ``pretrained=True`` does).
    The classifier gets as many classes as the file's, so a fine-tuned file loads as it is.
    """
    state = load_timm_state(path) if path is not None else None
    kwargs: dict = {}
    if state is not None:
        kwargs["num_classes"] = _num_classes_in(spec, state)
    if image_size is not None and spec.layout == "tokens" and \
            int(spec.data_config["input_size"][-1]) != image_size:
        kwargs["img_size"] = image_size
    if state is None:
        return _create_seeded(spec.timm_name, kwargs, seed, "cpu").eval()
    # weights to load: skip the random init (seconds for a ViT-S, minutes for a ViT-g)
    try:
        model = _create_seeded(spec.timm_name, kwargs, seed, "meta")
    except Exception:
        model = _create_seeded(spec.timm_name, kwargs, seed, "cpu")
    state = _filtered(model, state)
    check_state_dict(model, state, path, spec.name)
    model.load_state_dict(state, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        # a buffer computed in __init__ and not saved (e.g. Swin's relative position index)
        # stayed on the meta device: build for real and load into that
        model = _create_seeded(spec.timm_name, kwargs, seed, "cpu")
        model.load_state_dict(state)
    return model.eval()


def _create_seeded(timm_name: str, kwargs: dict, seed: int, device: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        try:
            return _create(timm_name, **kwargs)
        except TypeError:  # a model without an img_size argument takes any size
            if "img_size" not in kwargs:
                raise
            kwargs.pop("img_size")
            return _create(timm_name, **kwargs)


def _filtered(model: nn.Module, state: dict) -> dict:
    """timm's own ``checkpoint_filter_fn`` of the model's family (resamples position
    embeddings to the built size, maps original-release layouts); the state as is without."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        out = fn(dict(state), model)
    except Exception:  # a filter that does not understand the file: report keys as they are
        return state
    return out if isinstance(out, dict) else state


register_source(PREFIX, timm_spec)
