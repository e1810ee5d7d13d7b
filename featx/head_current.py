"""Is a stored head result still current? One answer for ``fit-heads`` and ``compare``.

A head result is current for a cache and a request when it was made from this very cache
file (its provenance, creation time included, equals the cache's attributes), its stored
``settings["request"]`` equals the request, and its fitted model and per-image test outputs
lie beside it (a result of a featx that wrote no outputs is fitted again, which adds them).

This module imports no sklearn (nor anything of :mod:`featx.heads`, whose package imports
it): ``compare`` asks it on a re-run that must stay cheap. It sits on the results floor of
the layers, and :mod:`featx.heads` exports its names.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx.results import head_model_path, image_outputs_path, jsonable

if TYPE_CHECKING:
    from featx.config import HeadsConfig

__all__ = ["current_head_result", "head_request", "select_for"]

# the request's keys that come from the head registry and the memory plan (sklearn's side)
_PLAN_KEYS = ("mode", "pca", "grid")


def select_for(config: HeadsConfig, has_val: bool) -> str:
    """Where hyperparameters are chosen for a cache: ``config.select``, or CV without val."""
    return config.select if has_val else "cv"


def head_request(config: HeadsConfig, *, head: str, feature: str, select_on: str,
                 streamed: bool, plan: tuple[str, int | None] | None = None,
                 grid: dict[str, list] | None = None) -> dict:
    """Everything a result depends on besides the cache, JSON-normalised as stored.

    ``head`` is the head fitted (``"sgd"`` when ``streamed``); ``plan`` is the memory
    plan's ``(mode, pca)`` and ``grid`` the head's search grid. Either may be None when
    the caller cannot know it without sklearn (``compare``): those keys are then left out,
    and :func:`current_head_result` does not compare them.
    """
    req: dict[str, Any] = {"head": head, "feature": feature}
    if plan is not None:
        req["mode"], req["pca"] = plan
    req.update({"select": select_on, "cv": config.cv, "standardize": config.standardize,
                "class_weight": config.class_weight, "seed": config.seed,
                "solver": config.solver, "wide_pca": config.wide_pca,
                "heads": list(config.heads) if streamed else [head]})
    if grid is not None:
        req["grid"] = grid
    return json.loads(json.dumps(req))


def current_head_result(path: Path, cache_attrs: dict, request: dict) -> dict | None:
    """The result JSON at ``path`` when it is current for a cache with ``cache_attrs`` and
    ``request``, else None. The stored request must equal ``request``, except for the
    plan's and grid's keys where ``request`` leaves them out (see :func:`head_request`)."""
    try:
        res = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or not head_model_path(path).is_file() \
            or not image_outputs_path(path).is_file():
        return None
    stored = (res.get("settings") or {}).get("request")
    same_cache = res.get("provenance") == json.loads(json.dumps(jsonable(cache_attrs)))
    same_request = isinstance(stored, dict) and request == {
        k: v for k, v in stored.items() if k in request or k not in _PLAN_KEYS}
    return res if same_cache and same_request else None
