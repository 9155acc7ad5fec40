"""The inference service: FastAPI over ONNX Runtime. Imports numpy, Pillow and onnxruntime, never torch."""

__version__ = "0.1.0"
