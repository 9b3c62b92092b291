"""Saved models for other runtimes: ONNX and TorchScript export with a parity check, an MLflow pyfunc."""
