"""Predictor: role classifier, output-length quantiles and KV-memory model (see ../shared/DESIGN.md).

``from predictor import Predictor``; ``Predictor.load(path).predict(body, headers) -> Prediction``.
scikit-learn and skops are imported only when training or loading a model file, and numpy only when
``Predictor`` or ``Prediction`` is first asked for: the gateway's config reads ``predictor.kv`` (KV bytes per
token of known architectures) whether or not it serves a predictor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from predictor.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from predictor import predictor as module

        return getattr(module, name)
    raise AttributeError(f"module 'predictor' has no attribute {name!r}")
