"""Predictor: role classifier, output-length quantiles and KV-memory model (see ../shared/DESIGN.md).

``from predictor import Predictor``; ``Predictor.load(path).predict(body, headers) -> Prediction``.
scikit-learn and skops are imported only when training or loading a model file.
"""

from predictor.predictor import Prediction, Predictor

__all__ = ["Prediction", "Predictor"]
