"""PyTorch model definitions (training and export only; the service never imports this)."""
