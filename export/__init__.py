"""Training, evaluation, ONNX export and parity checks. Imports models/ (torch) and service/ (the
manifest schema and the exact preprocessing the service applies, so training sees what serving sees)."""
