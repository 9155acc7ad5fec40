"""The probe graph the service opens on each GPU provider at start is the one export.probe writes."""

from __future__ import annotations

import onnx

from export.probe import probe_graph
from service.runtime import PROBE


def test_the_shipped_probe_is_what_export_probe_writes() -> None:
    assert onnx.load(PROBE) == probe_graph()
    assert {node.op_type for node in probe_graph().graph.node} == {"Conv", "MatMul"}  # cuDNN and cuBLAS
