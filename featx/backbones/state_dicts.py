"""Checking and loading a state dict into a built model: one line naming what does not fit."""
from __future__ import annotations

import torch
from torch import nn

from featx.backbones.registry import BackboneSpec, WeightsError

__all__ = ["check_state_dict", "load_state_dict"]


def check_state_dict(model: nn.Module, state: dict, path, name: str) -> None:
    """Raise one :class:`WeightsError` line when ``state`` (from the file ``path``) does not
    fit ``model``: counts of shape mismatches, missing and unexpected keys, with an example."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k}: file "
                         f"{tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise WeightsError(f"{path} does not fit {name}: " + "; ".join(parts) + ".")


def load_state_dict(spec: BackboneSpec, model: nn.Module, path: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {exc}".splitlines()[0]) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a featx/torchvision-reference checkpoint
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict (found {type(state).__name__}).")
    state = {k.removeprefix("module."): v for k, v in state.items()
             if not k.startswith(spec.ignore_keys or ("\0",))}
    check_state_dict(model, state, path, spec.name)
    model.load_state_dict(state)
