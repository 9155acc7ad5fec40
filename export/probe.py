"""`python -m export.probe`: writes service/probe.onnx, the tiny graph the service opens on each GPU
provider at start to prove it works (service.runtime.probe): a 1x1 convolution (cuDNN) and a matrix
product (cuBLAS) of ones, so ones of shape [1, 2, 4, 4] in give 8.0 everywhere out."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx_export import OPSET
from service.runtime import PROBE


def probe_graph() -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "weight")  # each channel: 1 + 1
    matrix = numpy_helper.from_array(np.ones((4, 4), np.float32), "matrix")  # each value: 4 x 2
    conv = helper.make_node("Conv", ["x", "weight"], ["summed"])
    graph = helper.make_graph(
        [conv, helper.make_node("MatMul", ["summed", "matrix"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 4, 4])],
        [weight, matrix],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vitserve")
    model.ir_version = 9  # what ONNX Runtime releases of the last years all read
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    onnx.save(probe_graph(), PROBE)
    print(f"wrote {PROBE}")


if __name__ == "__main__":
    main()
