"""The head registry: each head's estimator, its search grid, and how a fitted one scores.

A head is a :class:`HeadSpec` added with :func:`register_head`; :func:`build_head` makes the
``Pipeline([("scaler", StandardScaler() | "passthrough"), ("head", est)])`` every fit uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from featx.config import DEFAULT_HEADS
from featx.errors import FeatxError, ParameterError

__all__ = ["DEFAULT_HEADS", "HeadSpec", "build_head", "class_scores", "get_head", "list_heads",
           "parse_heads", "register_head"]

STREAM_GRID = {"alpha": [1e-3, 1e-4, 1e-5]}  # the sgd head's grid, also used when streaming


@dataclass(frozen=True)
class HeadSpec:
    """One head: how to build its estimator and which hyperparameters to search.

    ``grid`` maps estimator parameters to values, ordered from the strongest regularisation
    to the weakest: on a tie the first (simplest) setting wins. ``memory_factor`` is roughly
    how many float32 copies of the training matrix a fit holds (concatenation, fold slice,
    scaled copy, float64 conversions). ``fit_grid``, when given, narrows ``grid`` to the
    settings a fit on ``n_fit`` rows can take (see :meth:`grid_for`).
    """

    name: str
    build: Callable[[int, str | None], BaseEstimator]  # (seed, class_weight) -> estimator
    grid: dict[str, list]
    description: str
    memory_factor: float = 4.0
    supports_class_weight: bool = True
    fit_grid: Callable[[dict[str, list], int], dict[str, list]] | None = None

    def grid_for(self, n_fit: int) -> dict[str, list]:
        """The grid searched when each fit sees ``n_fit`` rows."""
        return self.fit_grid(self.grid, n_fit) if self.fit_grid else self.grid


def _neighbours_within(grid: dict[str, list], n_fit: int) -> dict[str, list]:
    """k-NN cannot ask for more neighbours than fit rows."""
    return {**grid, "n_neighbors": [k for k in grid["n_neighbors"] if k <= n_fit] or [1]}


_HEADS: dict[str, HeadSpec] = {}


def register_head(spec: HeadSpec) -> HeadSpec:
    """Add ``spec`` to the registry (a later spec with the same name replaces it)."""
    _HEADS[spec.name] = spec
    return spec


register_head(HeadSpec(
    "linear", lambda seed, cw: RidgeClassifier(class_weight=cw, random_state=seed),
    {"alpha": [1000.0, 100.0, 10.0, 1.0, 0.1]}, "RidgeClassifier (least squares, one-vs-rest)"))
register_head(HeadSpec(
    "logistic", lambda seed, cw: LogisticRegression(max_iter=1000, class_weight=cw,
                                                    random_state=seed),
    {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}, "LogisticRegression (multinomial, lbfgs)"))
register_head(HeadSpec(
    "svm", lambda seed, cw: LinearSVC(max_iter=5000, class_weight=cw, random_state=seed),
    {"C": [0.0001, 0.001, 0.01, 0.1, 1.0]}, "LinearSVC (squared hinge, one-vs-rest)",
    memory_factor=6.0))
register_head(HeadSpec(
    "mlp", lambda seed, cw: MLPClassifier(early_stopping=True, max_iter=200,
                                          n_iter_no_change=10, random_state=seed),
    {"alpha": [1e-2, 1e-4], "hidden_layer_sizes": [(128,), (512,)]},
    "MLPClassifier, one hidden ReLU layer, adam, early stopping on 10% of train",
    memory_factor=5.0, supports_class_weight=False))
register_head(HeadSpec(
    "rbf", lambda seed, cw: SVC(kernel="rbf", gamma="scale", class_weight=cw,
                                random_state=seed),
    {"C": [1.0, 10.0, 100.0]}, "SVC with RBF kernel (gamma='scale')", memory_factor=7.0))
register_head(HeadSpec(
    "knn", lambda seed, cw: KNeighborsClassifier(),
    {"n_neighbors": [15, 5, 1]}, "KNeighborsClassifier (Euclidean)",
    supports_class_weight=False, fit_grid=_neighbours_within))
register_head(HeadSpec(
    "sgd", lambda seed, cw: SGDClassifier(loss="log_loss", class_weight=cw, random_state=seed),
    dict(STREAM_GRID), "SGDClassifier(log_loss), the head used when features are streamed"))


def list_heads() -> list[str]:
    """Names of the registered heads, in registration order."""
    return list(_HEADS)


def get_head(name: str) -> HeadSpec:
    """The :class:`HeadSpec` called ``name``; an unknown name lists the known ones."""
    try:
        return _HEADS[name]
    except KeyError:
        raise FeatxError(f"unknown head {name!r}; available heads: "
                         f"{', '.join(list_heads())}.") from None


def parse_heads(text: str | Sequence[str]) -> list[str]:
    """``"linear,svm"`` (or a list) -> ``["linear", "svm"]``, each checked, duplicates dropped."""
    items = text.split(",") if isinstance(text, str) else list(text)
    names = list(dict.fromkeys(s.strip() for s in items if s and s.strip()))
    if not names:
        raise ParameterError("heads", text, f"name at least one of {', '.join(list_heads())}.")
    for name in names:
        get_head(name)
    return names


def build_head(name: str, *, standardize: bool = True, class_weight: str | None = None,
               seed: int = 0, params: dict | None = None) -> Pipeline:
    """An unfitted ``Pipeline([("scaler", ...), ("head", estimator)])`` for head ``name``.

    ``class_weight`` is dropped for heads that do not support it; ``params`` are head
    parameters without the ``head__`` prefix.
    """
    spec = get_head(name)
    est = spec.build(seed, class_weight if spec.supports_class_weight else None)
    if params:
        est.set_params(**params)
    return Pipeline([("scaler", StandardScaler() if standardize else "passthrough"),
                     ("head", est)])



def class_scores(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Scores of shape (n_samples, n_classes), or (n_samples,) for a complete 2-class model.

    ``predict_proba`` when the model has it, else ``decision_function``. Classes the model
    never saw in training get probability 0 (or a decision score below every other).
    """
    seen = np.asarray(model.classes_, dtype=int)
    if hasattr(model, "predict_proba"):
        s, fill = model.predict_proba(X), 0.0
    else:
        s, fill = model.decision_function(X), None
    if s.ndim == 1:
        if len(seen) == n_classes == 2:
            return s
        s = np.column_stack([-s, s])  # binary decision: positive means classes_[1]
    if len(seen) == n_classes:
        return s
    full = np.full((len(s), n_classes), fill if fill is not None else float(s.min()) - 1.0)
    full[:, seen] = s
    return full

