"""The Open Inference Protocol's gRPC messages (service/grpc_proto) to `codec.InferRequest`, and a
model's outputs to a `ModelInferResponse`: the gRPC counterpart of service/codec.py's JSON and binary
tensors, with its checks (datatypes, shapes, BYTES elements, value ranges) and its `CodecError`.

Inputs come as `raw_input_contents` (one entry per input, in order: little-endian values, BYTES as
4-byte length prefixes, as Triton's binary extension lays them out) or as typed `contents`. Outputs
always go as `raw_output_contents`, as Triton answers them and as tritonclient and KServe read them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.codec import (
    DATATYPES,
    CodecError,
    InferRequest,
    Requested,
    checked_datatype,
    checked_shape,
    datatype_of,
    from_bytes,
    requested,
    to_bytes,
)
from service.grpc_proto import grpc_predict_v2_pb2 as pb
from service.text import quoted

# each datatype's typed `contents` field, and the dtype its values arrive in (FP16: raw contents only)
CONTENTS: dict[str, tuple[str, np.dtype[Any]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT16": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "UINT16": ("uint_contents", np.dtype(np.uint32)),
    "UINT32": ("uint_contents", np.dtype(np.uint32)),
    "UINT64": ("uint64_contents", np.dtype(np.uint64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
}
PARAMETER_KINDS = ("bool_param", "int64_param", "string_param", "double_param", "uint64_param")


def parameter_values(
    parameters: Mapping[str, pb.InferParameter] | Mapping[str, pb.ModelRepositoryParameter],
) -> dict[str, Any]:
    """A parameters map (an inference's or a repository call's: both hold a oneof `parameter_choice`)
    as plain values (a parameter with none set is left out)."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        kind = parameter.WhichOneof("parameter_choice")
        if kind is not None:
            values[key] = getattr(parameter, kind)
    return values


def parse_request(message: pb.ModelInferRequest) -> InferRequest:
    """Every input as an array (BYTES: an object array of bytes); the outputs asked for, the
    parameters and the id."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise CodecError(f"raw_input_contents holds {len(raw)} tensors for {len(message.inputs)} inputs: "
                         "give every input's bytes there, or none")  # fmt: skip
    if not message.inputs:
        raise CodecError("the request needs inputs")
    inputs: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(message.inputs):
        if not tensor.name:
            raise CodecError("an input needs a name")
        if tensor.name in inputs:
            raise CodecError(f"input {quoted(tensor.name)} appears twice")
        try:
            inputs[tensor.name] = _input(tensor, raw[index] if raw else None)
        except CodecError as exc:
            raise CodecError(f"input {quoted(tensor.name)}: {exc}") from None
    names = [output.name for output in message.outputs]
    if len(set(names)) != len(names):
        raise CodecError("an output is asked for twice")
    outputs = [Requested(name) for name in names] or None
    return InferRequest(inputs, parameter_values(message.parameters), outputs, message.id or None)


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    datatype, shape = checked_datatype(tensor.datatype), checked_shape(list(tensor.shape))
    if raw is not None:
        if tensor.HasField("contents"):
            raise CodecError("it has both contents and raw_input_contents")
        return from_bytes(memoryview(raw), datatype, shape)
    if datatype == "BYTES":
        items = list(tensor.contents.bytes_contents)
        if len(items) != math.prod(shape):
            raise CodecError(f"its contents hold {len(items)} BYTES elements; shape {quoted(shape)} holds "
                             f"{math.prod(shape)}")  # fmt: skip
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    return _typed(tensor.contents, datatype, shape)


def _typed(contents: pb.InferTensorContents, datatype: str, shape: list[int]) -> np.ndarray:
    """Typed contents as the datatype: its own field only, as many values as the shape holds, each
    within the datatype's range (an INT8 arrives as an int32)."""
    if datatype not in CONTENTS:
        raise CodecError(f"{datatype} has no typed contents: send it in raw_input_contents")
    field, carrier = CONTENTS[datatype]
    others = [f for f, _ in CONTENTS.values() if f != field] + ["bytes_contents"]
    if any(len(getattr(contents, other)) for other in others):
        raise CodecError(f"{datatype} values belong in contents.{field} alone")
    values = np.asarray(getattr(contents, field), dtype=carrier)
    if values.size != math.prod(shape):
        raise CodecError(f"its contents hold {values.size} values; shape {quoted(shape)} holds {math.prod(shape)}")
    dtype = DATATYPES[datatype]
    if dtype.kind in "iu" and values.size:
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        if values.min() < low or values.max() > high:
            raise CodecError(f"{datatype} contents hold values outside [{low}, {high}]")
    return values.astype(dtype, copy=False).reshape(shape)


def encode_response(
    model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    """The outputs asked for (all by default, in the model's order), each as raw contents."""
    answer = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id or "")
    for output in requested(request, list(outputs)):
        array = outputs[output.name]
        answer.outputs.add(name=output.name, datatype=datatype_of(array), shape=list(array.shape))
        answer.raw_output_contents.append(to_bytes(array))
    return answer


def tensor_metadata(tensors: Sequence[dict[str, Any]]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
            for t in tensors]  # fmt: skip


def repository_parameters(parameters: Mapping[str, pb.ModelRepositoryParameter]) -> dict[str, Any]:
    """A load's parameters as plain values (`config`: the JSON string Triton takes; `file:...`: bytes)."""
    return parameter_values(parameters)
