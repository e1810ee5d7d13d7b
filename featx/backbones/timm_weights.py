"""timm's weights: its pretrained file in the Hugging Face hub cache (or torch's, for the few
models hosted by URL), which of a list of models have one cached, reading a timm state dict or
checkpoint file, and building a timm model with such a file loaded."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from featx.backbones.registry import WeightsError
import sys

from torch import nn

from featx.backbones.state_dicts import check_state_dict
from featx.backbones.timm_models import (PREFIX, TimmSpec, create_timm_model, import_timm,
                                         timm_spec)

__all__ = ["build_timm_model", "load_timm_state", "timm_cached_names", "timm_pretrained_file"]


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
    timm = import_timm()
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
            return create_timm_model(timm_name, **kwargs)
        except TypeError:  # a model without an img_size argument takes any size
            if "img_size" not in kwargs:
                raise
            kwargs.pop("img_size")
            return create_timm_model(timm_name, **kwargs)


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
