"""The Open Inference Protocol's codec (KServe v2 as Triton speaks it, with Triton's binary tensor
extension): a request's bytes to numpy arrays, and arrays to a response's bytes.

Pure (numpy, json, struct; pydantic-core's encoder for long JSON answers) and strict: whatever a
client sends either parses or raises `CodecError`, whose message the HTTP adapter answers as the
protocol's 400 `{"error": ...}`. Nothing here knows HTTP.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic_core import to_json

from service.text import encodable, quoted

if TYPE_CHECKING:
    from service.manifest import TensorSpec

DATATYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(dtype)
    for name, dtype in {
        "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
        "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
    }.items()
}  # fmt: skip
FROM_MANIFEST = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32", "uint8": "UINT8",
                 "bool": "BOOL"}  # fmt: skip
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_RANK = 32  # numpy's own limit is 64; no model here has more than 4
MAX_ELEMENTS = 2**40  # of a shape with its zero dims left out: numpy refuses far less than 2**64
MAX_DEPTH = MAX_RANK + 8  # JSON nesting: a tensor's data inside the request's own few levels


class CodecError(ValueError):
    """A request the protocol refuses; its message is the client's 400."""


@dataclass(frozen=True)
class Requested:
    """An output the client asked for; `binary` None: as the request's `binary_data_output` says."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    outputs: list[Requested] | None = None  # None: every output, in the model's order
    id: str | None = None


# request ---------------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """The request's JSON header and every input as an array (BYTES: an object array of bytes). With
    `header_length` (Triton's binary extension) the header is that many bytes, the tensors after it."""
    split = _header_length(header_length, len(body))
    header = load_json(body[:split])
    if not isinstance(header, dict):
        raise CodecError("the request header must be a JSON object")
    tensors = header.get("inputs")
    if not isinstance(tensors, list) or not tensors or not all(isinstance(t, dict) for t in tensors):
        raise CodecError('the request needs "inputs": a non-empty list of tensors (objects)')
    parameters = _parameters(header.get("parameters"), "the request")
    if type(parameters.get("binary_data_output", False)) is not bool:
        raise CodecError('parameter "binary_data_output" must be true or false')
    inputs = _inputs(tensors, memoryview(body)[split:])
    return InferRequest(inputs, parameters, _outputs(header.get("outputs")), _id(header.get("id")))


def _header_length(value: str | None, size: int) -> int:
    if value is None:
        return size
    if not (value.isascii() and value.isdigit() and len(value) < 20 and int(value) <= size):
        raise CodecError(
            f"{HEADER_LENGTH} must be a whole number of bytes within the body's {size}, not {quoted(value)}"
        )
    return int(value)


# Parsing JSON holds the interpreter's lock (about 0.2 us a number here, 0.7 us an object key: each
# is a new string, memoised) in whichever thread parses, and json.loads is one C call that never lets
# go of it, so a document of millions of numbers would stall every other request for a second, and
# 290,000 keys (3.8 MB) for 0.2 s. Counting its commas and colons first is cheap; tensors that big go
# as binary data (Triton's binary tensor extension); no request needs thousands of keys.
MAX_JSON_VALUES = 300_000
MAX_JSON_KEYS = 10_000  # colons, an upper bound on keys: about 5 ms of parsing


def check_json_values(raw: bytes) -> None:
    """Refuses JSON holding more than MAX_JSON_VALUES values or MAX_JSON_KEYS keys, before it is parsed."""
    if (values := raw.count(b",") + 1) > MAX_JSON_VALUES:
        raise CodecError(
            f"the JSON holds about {values} values; the limit is {MAX_JSON_VALUES}: send big tensors as binary data"
        )
    if (keys := raw.count(b":")) > MAX_JSON_KEYS:
        raise CodecError(f"the JSON holds up to {keys} object keys (its colons); the limit is {MAX_JSON_KEYS}")


def load_json(raw: bytes | memoryview) -> Any:
    """JSON that is JSON: UTF-8, no NaN or Infinity literals, nested at most MAX_DEPTH deep, and at
    most MAX_JSON_VALUES values."""
    text = bytes(raw)
    check_json_values(text)
    try:
        value = json.loads(text.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:  # the parser's own guard, far below anything that would crash
        raise CodecError("the request header is nested too deep") from None
    except ValueError as exc:  # also UnicodeDecodeError, and integers of over 4,300 digits
        raise CodecError(f"the request header is not valid JSON: {quoted(exc, 120)}") from None
    if not _shallow(value, MAX_DEPTH):
        raise CodecError(f"the request header is nested more than {MAX_DEPTH} deep")
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _shallow(value: Any, depth: int) -> bool:
    """Whether `value` nests at most `depth` lists or objects deep (level by level: no recursion)."""
    level = [value] if isinstance(value, list | dict) else []
    for _ in range(depth):
        level = [c for v in level for c in _containers(v)]
        if not level:
            return True
    return False


def _containers(value: list[Any] | dict[str, Any]) -> list[Any]:
    """The lists and objects directly inside `value` (a long list of numbers is scanned at C speed)."""
    items = list(value.values()) if isinstance(value, dict) else value
    if not {list, dict} & set(map(type, items)):
        return []
    return [item for item in items if isinstance(item, list | dict)]


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CodecError(f'"parameters" of {where} must be an object')
    return value


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or not encodable(value):
        raise CodecError(f'{what} needs a "name": a non-empty string')
    return value


def _id(value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and encodable(value)):
        raise CodecError('"id" must be a string')
    return value


def _outputs(value: Any) -> list[Requested] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(o, dict) for o in value):
        raise CodecError('"outputs" must be a list of objects')
    wanted = [_output(output) for output in value]
    if len({o.name for o in wanted}) != len(wanted):
        raise CodecError("an output is asked for twice")
    return wanted or None


def _output(output: dict[str, Any]) -> Requested:
    name = _name(output.get("name"), "an output")
    parameters = _parameters(output.get("parameters"), f"output {quoted(name)}")
    binary = parameters.get("binary_data")
    if binary is not None and type(binary) is not bool:
        raise CodecError(f'output {quoted(name)}: "binary_data" must be true or false')
    if "classification" in parameters:
        raise CodecError("the classification extension is not supported")
    return Requested(name, binary)


def _inputs(tensors: list[dict[str, Any]], binary: memoryview) -> dict[str, np.ndarray]:
    """Every input; those with `binary_data_size` take their bytes from the tail, in order, which they
    must use up exactly."""
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        name = _name(tensor.get("name"), "an input")
        if name in inputs:
            raise CodecError(f"input {quoted(name)} appears twice")
        try:
            size = _binary_size(tensor, len(binary) - offset)
            if size is None:
                inputs[name] = from_json(tensor["data"], _datatype(tensor), _shape(tensor))
            else:
                inputs[name] = from_bytes(binary[offset : offset + size], _datatype(tensor), _shape(tensor))
                offset += size
        except CodecError as exc:
            raise CodecError(f"input {quoted(name)}: {exc}") from None
    if offset != len(binary):
        raise CodecError(f"{len(binary) - offset} bytes after the header belong to no input")
    return inputs


def _binary_size(tensor: dict[str, Any], left: int) -> int | None:
    """The tensor's `binary_data_size`, within the `left` bytes of the tail; None for JSON data."""
    size = _parameters(tensor.get("parameters"), "an input").get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise CodecError('it needs "data", or "binary_data_size" in its parameters')
        return None
    if "data" in tensor:
        raise CodecError('it has both "data" and "binary_data_size"')
    if type(size) is not int or not 0 <= size <= left:
        raise CodecError(f'"binary_data_size" must be a whole number of bytes within the {left} left')
    return size


def _datatype(tensor: dict[str, Any]) -> str:
    return checked_datatype(tensor.get("datatype"))


def checked_datatype(datatype: Any) -> str:
    """One of the protocol's datatypes (every protocol adapter's check)."""
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise CodecError(f'"datatype" must be one of {", ".join(DATATYPES)}')
    return datatype


def _shape(tensor: dict[str, Any]) -> list[int]:
    return checked_shape(tensor.get("shape"))


def checked_shape(shape: Any) -> list[int]:
    """A shape of at most MAX_RANK whole numbers holding at most MAX_ELEMENTS (every protocol adapter's check)."""
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(type(d) is int and d >= 0 for d in shape):
        raise CodecError(f'"shape" must be a list of at most {MAX_RANK} whole numbers >= 0')
    if math.prod(d or 1 for d in shape) > MAX_ELEMENTS:
        raise CodecError(f'"shape" holds more than 2**40 elements: {quoted(shape)}')
    return shape


# tensor data -----------------------------------------------------------------------------------


def from_json(data: Any, datatype: str, shape: list[int]) -> np.ndarray:
    """JSON `data`, flat or nested as `shape`, whose values are all of the datatype's JSON type."""
    leaves = _leaves(data, shape)
    if datatype == "BYTES":
        if not all(isinstance(item, str) and encodable(item) for item in leaves):
            raise CodecError("BYTES data in JSON must be strings")
        return _objects([item.encode() for item in leaves]).reshape(shape)
    return _numbers(leaves, DATATYPES[datatype], datatype).reshape(shape)


def _leaves(data: Any, shape: list[int]) -> list[Any]:
    """The values of `data`: a flat list as long as the shape's element count, or lists nested as the
    shape (level by level: no recursion)."""
    if not isinstance(data, list):
        raise CodecError('"data" must be a list')
    count = math.prod(shape)
    if not data or not isinstance(data[0], list):  # flat: a list among the values is refused by type
        if len(data) != count:
            raise CodecError(f'"data" holds {len(data)} values; shape {quoted(shape)} holds {count}')
        return data
    level = [data]
    for dim in shape:
        if not all(isinstance(item, list) and len(item) == dim for item in level):
            raise CodecError(f'"data" is nested unlike shape {quoted(shape)}')
        level = [item for items in level for item in items]
    if any(isinstance(item, list) for item in level):
        raise CodecError(f'"data" is nested deeper than shape {quoted(shape)}')
    return level


# the JSON types each kind of datatype takes (bool is no int here), and how a message says them
JSON_KINDS: dict[str, tuple[set[type], str]] = {
    "b": ({bool}, "true or false"),
    "i": ({int}, "integers"),
    "u": ({int}, "integers"),
    "f": ({int, float}, "finite numbers"),
}


def _numbers(leaves: list[Any], dtype: np.dtype[Any], datatype: str) -> np.ndarray:
    """The values as `dtype`, if each has the right JSON type and fits: no wrapping, no overflow."""
    kinds, described = JSON_KINDS[dtype.kind]
    if not set(map(type, leaves)) <= kinds:
        raise CodecError(f"{datatype} data must be {described}")
    if dtype.kind in "iu":
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        if leaves and not (low <= min(leaves) and max(leaves) <= high):
            raise CodecError(f"{datatype} data holds values outside [{low}, {high}]")
    if dtype.kind == "f":
        try:
            values = np.array(leaves, dtype=np.float64)
        except OverflowError:  # an integer past float64's range
            raise CodecError(f"{datatype} data holds values too large for it") from None
        if values.size and not (np.isfinite(values).all() and np.abs(values).max() <= np.finfo(dtype).max):
            raise CodecError(f"{datatype} data holds values too large for it")
        return values.astype(dtype)
    return np.array(leaves, dtype=dtype)


def from_bytes(raw: memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    """Raw little-endian values, or BYTES elements each after its 4-byte little-endian length."""
    count = math.prod(shape)
    if datatype == "BYTES":
        return _objects(_elements(raw, count)).reshape(shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise CodecError(
            f"binary_data_size is {len(raw)} bytes; {count} {datatype} values take {count * dtype.itemsize}"
        )
    if datatype == "BOOL":
        flags = np.frombuffer(raw, dtype=np.uint8)
        if flags.size and flags.max() > 1:
            raise CodecError("BOOL bytes must be 0 or 1")
        return flags.view(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _elements(raw: memoryview, count: int) -> list[bytes]:
    items: list[bytes] = []
    at = 0
    while at < len(raw):
        if len(raw) - at < 4 or len(items) == count:
            raise CodecError(f"its bytes hold more than {count} BYTES elements, or a cut length prefix")
        (length,) = struct.unpack_from("<I", raw, at)
        if length > len(raw) - at - 4:
            raise CodecError(f"a BYTES element of {length} bytes runs past its tensor's {len(raw)}")
        items.append(bytes(raw[at + 4 : at + 4 + length]))
        at += 4 + length
    if len(items) != count:
        raise CodecError(f"its bytes hold {len(items)} BYTES elements; its shape holds {count}")
    return items


def _objects(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


# against the model -----------------------------------------------------------------------------


def model_inputs(inputs: dict[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """The graph's feeds: every input it takes and no other, each `checked`, and its named dims (the
    batch) the same size wherever they appear."""
    unknown = sorted(set(inputs) - {spec.name for spec in specs})
    if unknown:
        raise CodecError(f"the model takes no input {quoted(unknown[0])}; it takes {[s.name for s in specs]}")
    feeds = {spec.name: checked(required(inputs, spec.name), spec) for spec in specs}
    sizes: dict[str, set[int]] = {}
    for spec in specs:
        for dim, size in zip(spec.shape, feeds[spec.name].shape, strict=True):
            if isinstance(dim, str):
                sizes.setdefault(dim, set()).add(size)
    if any(len(found) > 1 for found in sizes.values()):
        raise CodecError("every input must have the same batch size")
    return feeds


def required(inputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in inputs:
        raise CodecError(f"input {quoted(name)} is missing; the model takes it")
    return inputs[name]


def checked(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The array as the graph's dtype, if its shape fits (fixed axes equal, same rank), its values
    survive the cast (no text, no fractions or out-of-range numbers into integers, no finite number
    into infinity) and lie in the manifest's range: an input that would fail the graph never joins
    a batch."""
    shape, datatype = spec.shape, FROM_MANIFEST[spec.dtype]
    if len(array.shape) != len(shape) or any(
        isinstance(d, int) and d != a for d, a in zip(shape, array.shape, strict=True)
    ):
        wanted = [d if isinstance(d, int) else -1 for d in shape]
        raise CodecError(f"input {quoted(spec.name)} has shape {list(array.shape)}; the model takes {wanted}")
    if array.dtype == object:
        raise CodecError(f"input {quoted(spec.name)} is BYTES; the model takes {datatype}")
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or 1e300 into an integer: refused just below
        cast = array.astype(spec.dtype)
    lossy = not np.array_equal(np.isfinite(cast), np.isfinite(array))
    if lossy or (cast.dtype.kind in "biu" and not np.array_equal(cast, array)):
        raise CodecError(f"input {quoted(spec.name)} holds values that are not {datatype}")
    if spec.range is not None and cast.size and not (spec.range[0] <= cast.min() and cast.max() <= spec.range[1]):
        low, high = spec.range
        raise CodecError(f"input {quoted(spec.name)} holds values outside [{low:g}, {high:g}]")
    return cast


# response --------------------------------------------------------------------------------------


def requested(request: InferRequest, names: Sequence[str]) -> list[Requested]:
    """The outputs to answer (all by default), each one the model has."""
    wanted = request.outputs or [Requested(name) for name in names]
    for output in wanted:
        if output.name not in names:
            raise CodecError(f"output {quoted(output.name)} is not one of {list(names)}")
    return wanted


def encode_response(
    model: str, version: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, list[bytes]]:
    """The answer's JSON head and the binary blobs after it (outputs asked for as binary, or all
    with `binary_data_output`); JSON has no NaN or infinities: they are null, as KServe writes them."""
    default = request.parameters.get("binary_data_output", False)
    tensors, blobs = [], []
    for output in requested(request, list(outputs)):
        array = outputs[output.name]
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if output.binary if output.binary is not None else default:
            blobs.append(to_bytes(array))
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            flat = array.ravel()
            tensor["data"] = [b.decode(errors="replace") for b in flat] if array.dtype == object else flat.tolist()
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        body["id"] = request.id
    # pydantic-core's compiled encoder: long tensors as JSON lists are its strength
    return to_json(body, inf_nan_mode="null"), blobs


def to_bytes(array: np.ndarray) -> bytes:
    if array.dtype != object:
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())


def datatype_of(array: np.ndarray) -> str:
    return next(name for name, dtype in DATATYPES.items() if dtype == array.dtype)
