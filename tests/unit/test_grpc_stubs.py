"""The checked-in gRPC stubs are what protoc makes of the checked-in .proto (tools/grpc_stubs.py), in
a descriptor pool of their own: the service imports beside KServe's stubs, which define the same names."""

from __future__ import annotations

import pytest

from tools import grpc_stubs


def test_the_stubs_are_protocs_output_of_the_proto() -> None:
    pytest.importorskip("grpc_tools")
    grpc_stubs.main(["--check"])


def test_the_stubs_live_beside_kserves() -> None:
    kserve_stubs = pytest.importorskip("kserve.protocol.grpc.grpc_predict_v2_pb2")
    from service.grpc_proto import grpc_predict_v2_pb2 as ours

    assert ours.DESCRIPTOR.pool is not kserve_stubs.DESCRIPTOR.pool
    assert ours.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name == "inference.GRPCInferenceService"
    request = ours.ModelInferRequest(model_name="vit", raw_input_contents=[b"\0" * 4])
    assert kserve_stubs.ModelInferRequest.FromString(request.SerializeToString()).model_name == "vit"
