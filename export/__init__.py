"""Export CAV-MAE stages to fixed-shape ONNX graphs with a manifest (``cavmae.export``)."""

from .onnx_export import OPSET, PRECISIONS, ExportResult, export_model

__all__ = ["OPSET", "PRECISIONS", "ExportResult", "export_model"]
