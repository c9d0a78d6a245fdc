"""Export CAV-MAE stages to fixed-shape ONNX graphs with a manifest."""
