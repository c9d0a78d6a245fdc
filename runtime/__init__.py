"""Run exported CAV-MAE graphs on ONNX Runtime, TensorRT or PyTorch."""
