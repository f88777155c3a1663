"""Hardware models: targets, analytic latency/energy prediction, budgets and measurement.

``predict(table, target)`` works on a CostTable (graph plus policy), without
building the compressed model. ``measure_onnx`` / ``measure_model`` time a
model in ONNX Runtime, which is imported only when they are called.
"""

from autocompress.hwmodels.budget import Budget, parse_budget
from autocompress.hwmodels.measure import Measurement, measure_model, measure_onnx, profile_onnx
from autocompress.hwmodels.predict import PARTS, LayerPrediction, Prediction, predict
from autocompress.hwmodels.target import Target
from autocompress.hwmodels.targets import TARGETS, cache_dir, get_target, target_names, target_path

__all__ = [
    "TARGETS", "Budget", "LayerPrediction", "Measurement", "Prediction", "Target", "cache_dir", "get_target",
    "PARTS", "measure_model", "measure_onnx", "parse_budget", "predict", "profile_onnx", "target_names", "target_path",
]
