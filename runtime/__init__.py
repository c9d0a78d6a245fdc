"""Run exported CAV-MAE graphs on ONNX Runtime, TensorRT or PyTorch (``cavmae.runtime``).

Importing this package needs neither torch nor TensorRT; engines import them when created.
"""

from .loader import ModelSource, load, resolve_model
from .pipeline import Pipeline, Prediction, Reconstruction

__all__ = ["ModelSource", "Pipeline", "Prediction", "Reconstruction", "load", "resolve_model"]
