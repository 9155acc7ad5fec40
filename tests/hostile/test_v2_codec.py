"""The /v2 codec against an attacker. Properties of the pure codec (`service.codec`), fuzzed by
Hypothesis: what Triton's client encodes parses back to the same arrays, and any bytes, header or
mutation of a valid request either parses or raises `CodecError`, never anything else. Through the
app: no generated request gets a 5xx. Then one case per hole the audit found, with its status."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.http._utils import _get_inference_request

from service.codec import (
    DATATYPES,
    MAX_DEPTH,
    CodecError,
    InferRequest,
    encode_response,
    model_inputs,
    parse_request,
)
from service.manifest import read_manifest
from service.settings import PROJECT_ROOT, Settings
from tests.conftest import SHIPPED_REPOSITORY, client_for

FUZZ = settings(derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))


def fuzz(examples: int) -> settings:
    """Deterministic (the same examples in CI as here), bounded, and no clock."""
    return settings(FUZZ, max_examples=examples)


GRAPHS = {name: read_manifest(SHIPPED_REPOSITORY / name / "1").main for name in ("vit", "detr", "imagetransformer")}


# a client's requests, as Triton's own client encodes them -------------------------------------------


def triton_request(arrays: dict[str, np.ndarray], binary: bool, **extra: Any) -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length that `tritonclient.http` sends for these inputs."""
    inputs = []
    for name, array in arrays.items():
        datatype = next(k for k, v in DATATYPES.items() if v == array.dtype)
        inputs.append(triton.InferInput(name, list(array.shape), datatype).set_data_from_numpy(array, binary))
    body, length = _get_inference_request(inputs, extra.get("id", ""), extra.get("outputs"), 0, False, False, 0,
                                          None, extra.get("parameters"))  # fmt: skip
    return body, None if length is None else str(length)


def array_of(datatype: str, shape: list[int], binary: bool) -> st.SearchStrategy[np.ndarray]:
    """Random values of every kind the datatype holds (JSON: finite numbers and UTF-8 text only)."""
    dtype, count = DATATYPES[datatype], int(np.prod(shape))
    if datatype == "BYTES":
        items = st.binary(max_size=6) if binary else st.text(max_size=6).map(str.encode)
        return st.lists(items, min_size=count, max_size=count).map(lambda v: objects(v).reshape(shape))
    raw = st.binary(min_size=count * dtype.itemsize, max_size=count * dtype.itemsize)
    values = raw.map(lambda b: np.frombuffer(b, dtype=np.uint8 if datatype == "BOOL" else dtype).reshape(shape))
    if datatype == "BOOL":
        return values.map(lambda a: np.asarray(a % 2, dtype=bool))
    if dtype.kind == "f" and not binary:  # JSON has no NaN or infinities
        return values.map(lambda a: np.asarray(np.where(np.isfinite(a), a, 0), dtype=dtype))
    return values


def objects(items: list[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


SHAPES = st.lists(st.integers(0, 3), max_size=3)


@st.composite
def tensors(draw: st.DrawFn, binary: bool) -> dict[str, np.ndarray]:
    names = draw(st.lists(st.sampled_from(["a", "b", "pixels", "é"]), min_size=1, max_size=3, unique=True))
    return {name: draw(array_of(draw(st.sampled_from(list(DATATYPES))), draw(SHAPES), binary)) for name in names}


def same(got: np.ndarray, sent: np.ndarray) -> bool:
    return (
        got.dtype == sent.dtype
        and got.shape == sent.shape
        and np.array_equal(got, sent, equal_nan=sent.dtype.kind == "f")
    )


@fuzz(150)
@given(st.booleans().flatmap(lambda binary: st.tuples(st.just(binary), tensors(binary))))
def test_what_tritonclient_sends_parses_to_the_same_arrays(case: tuple[bool, dict[str, np.ndarray]]) -> None:
    binary, arrays = case
    parsed = parse_request(*triton_request(arrays, binary, id="r"))
    assert parsed.id == "r" and list(parsed.inputs) == list(arrays)
    assert all(same(parsed.inputs[name], array) for name, array in arrays.items())


@fuzz(100)
@given(tensors(binary=False))
def test_json_data_nested_as_the_shape_parses_as_flat_data(arrays: dict[str, np.ndarray]) -> None:
    """KServe's JSON allows data nested as the shape; tritonclient sends it flat: both are the same."""
    body, _ = triton_request(arrays, binary=False)
    header = json.loads(body)
    for tensor, array in zip(header["inputs"], arrays.values(), strict=True):
        nested = np.vectorize(bytes.decode, otypes=[object])(array) if array.dtype == object else array
        tensor["data"] = nested.tolist() if array.ndim else [nested.item()]
    parsed = parse_request(json.dumps(header).encode(), None)
    assert all(same(parsed.inputs[name], array) for name, array in arrays.items())


@fuzz(100)
@given(st.booleans().flatmap(lambda binary: st.tuples(st.just(binary), tensors(binary))))
def test_answers_read_back_through_tritonclient(case: tuple[bool, dict[str, np.ndarray]]) -> None:
    binary, arrays = case
    head, blobs = encode_response("m", "1", InferRequest({}, {"binary_data_output": binary}, id="r"), arrays)
    result = triton.InferResult.from_response_body(head + b"".join(blobs), header_length=len(head) if blobs else None)
    for name, sent in arrays.items():
        got = result.as_numpy(name)
        if sent.dtype == object:  # tritonclient reads BYTES as bytes from binary, as text from JSON
            items = [item.encode() if isinstance(item, str) else bytes(item) for item in got.ravel()]
            assert items == list(sent.ravel()) and got.shape == sent.shape
        elif binary:
            assert same(got, sent)
        else:  # JSON: NaN and infinities are null
            np.testing.assert_array_equal(np.array(got, dtype=np.float64), np.where(np.isfinite(sent), sent, np.nan))


def parses_or_refuses(body: bytes, length: str | None) -> None:
    """The codec's contract: a request, or CodecError; with the model's inputs the same."""
    try:
        request = parse_request(body, length)
        event("parsed")
        for name, graph in GRAPHS.items():
            model_inputs(request.inputs, graph.inputs)
            event(f"fits {name}")
    except CodecError:
        event("refused")


LENGTHS = st.one_of(st.none(), st.integers(-5, 300).map(str), st.text(max_size=8))


@fuzz(300)
@given(st.binary(max_size=300), LENGTHS)
def test_any_bytes_parse_or_are_refused(body: bytes, length: str | None) -> None:
    parses_or_refuses(body, length)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)
FIELDS = {
    "name": st.sampled_from(["pixel_values", "pixels", "labels", "image"]) | JSON,
    "datatype": st.sampled_from(list(DATATYPES)) | JSON,
    "shape": st.lists(st.integers(-2, 70), max_size=4) | JSON,
    "data": st.lists(st.integers() | st.floats() | st.booleans() | st.text(max_size=3), max_size=70) | JSON,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 300) | JSON}) | JSON,
}
TENSOR = st.fixed_dictionaries({}, optional=FIELDS)
HEADER = st.fixed_dictionaries(
    {}, optional={"inputs": st.lists(TENSOR, max_size=3) | JSON, "outputs": JSON, "parameters": JSON, "id": JSON}
)


@fuzz(300)
@given(HEADER | JSON, st.binary(max_size=64), st.booleans())
def test_any_header_parses_or_is_refused(header: Any, tail: bytes, split: bool) -> None:
    head = json.dumps(header).encode()  # NaN and infinities come out as bare literals: refused too
    parses_or_refuses(head + tail, str(len(head)) if split else None)


Edit = tuple[int, bytes, int]
EDITS = st.tuples(st.integers(0, 10**6), st.binary(max_size=3), st.integers(0, 3))


def mutated(body: bytes, edits: list[Edit]) -> bytes:
    """At each place (wrapped into the body), `cut` bytes replaced by `text`."""
    for at, text, cut in edits:
        at %= len(body) + 1
        body = body[:at] + text + body[at + cut :]
    return body


@fuzz(300)
@given(tensors(binary=True), st.lists(EDITS, min_size=1, max_size=4))
def test_mutated_requests_parse_or_are_refused(arrays: dict[str, np.ndarray], edits: list[Edit]) -> None:
    """Bytes of a valid binary request replaced, cut or inserted, anywhere in its header or tail."""
    body, length = triton_request(arrays, binary=True)
    parses_or_refuses(mutated(body, edits), length)


def test_the_codec_is_pure() -> None:
    """No FastAPI or Starlette in the codec: it is fuzzed, and reused, without an app."""
    tree = ast.parse((PROJECT_ROOT / "service" / "codec.py").read_text())
    found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    found |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert found <= {"__future__", "json", "math", "struct", "collections.abc", "dataclasses", "typing", "numpy",
                     "pydantic_core", "service.text", "service.manifest"}  # fmt: skip


# the app: no generated request gets a 5xx -----------------------------------------------------------

PIXELS = np.zeros((1, 1, 32, 32), dtype=np.float32)
DIGIT = (PROJECT_ROOT / "examples" / "digit-7.png").read_bytes()
VALID = {
    "vit": {"pixel_values": PIXELS},
    "imagetransformer": {"pixels": np.zeros((1, 64), dtype=np.int64), "labels": np.array([3])},
    "vit_image": {"image": objects([DIGIT])},
}


@st.composite
def app_requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """A valid request for one of the shipped models, as tritonclient sends it, then mutated."""
    model = draw(st.sampled_from(list(VALID)))
    arrays = dict(VALID[model])
    binary = draw(st.booleans()) or model == "vit_image"  # a PNG is no UTF-8 text: binary only
    if draw(st.booleans()):  # another value, datatype or shape in the place of one input
        name = draw(st.sampled_from(list(arrays)))
        datatype = draw(st.sampled_from(list(DATATYPES)))
        shape = draw(st.sampled_from([list(arrays[name].shape), [1], [2, 64]]))
        arrays[name] = draw(array_of(datatype, shape, binary))
    parameters = draw(st.none() | st.fixed_dictionaries({}, optional={"top_k": JSON, "threshold": JSON}))
    body, length = triton_request(arrays, binary, parameters=parameters)
    body = mutated(body, draw(st.lists(EDITS, max_size=2)))
    return model, body, {} if length is None else {"Inference-Header-Content-Length": length}


@fuzz(120)
@given(app_requests())
def test_no_generated_request_gets_a_5xx(client: TestClient, request: tuple[str, bytes, dict[str, str]]) -> None:
    model, body, headers = request
    response = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    event(f"{model}: {response.status_code}")
    assert response.status_code < 500, response.text
    assert response.status_code == 200 or set(response.json()) == {"error"}


# each hole the audit found, with its status ---------------------------------------------------------

TENSOR_PIXELS = {"name": "pixel_values", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}
NO_DATA = {k: v for k, v in TENSOR_PIXELS.items() if k != "data"}


def binary(tensor: dict[str, Any], size: Any) -> dict[str, Any]:
    return {**{k: v for k, v in tensor.items() if k != "data"}, "parameters": {"binary_data_size": size}}


def image(data: Any, **tensor: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(data)], "data": data, **tensor}]}


def it_tensors(pixels: Any, labels: Any, datatype: str = "INT64") -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "datatype": datatype, "shape": [1, 64], "data": pixels},
                       {"name": "labels", "datatype": "INT64", "shape": [1], "data": labels}]}  # fmt: skip


def post(client: TestClient, model: str, header: Any, tail: bytes = b"", length: str | None = None) -> Any:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    if length is None and tail:
        length = str(len(head))
    headers = {} if length is None else {"Inference-Header-Content-Length": length}
    return client.post(f"/v2/models/{model}/infer", content=head + tail, headers=headers)


HEADER_WORD = "Inference-Header-Content-Length"
CASES: list[tuple[str, str, Any, bytes, str | None, str]] = [
    # (what, model, header, binary tail, header length, a word of the message)
    ("BYTES to a raw view", "vit", {"inputs": [{**TENSOR_PIXELS, "datatype": "BYTES", "data": ["a"] * 1024}]},
     b"", None, "BYTES"),
    ("an integer as a BYTES item", "vit_image", image([10**13]), b"", None, "strings"),
    ("outputs not objects", "vit", {"inputs": [TENSOR_PIXELS], "outputs": ["logits"]}, b"", None, "outputs"),
    ("outputs an object", "vit", {"inputs": [TENSOR_PIXELS], "outputs": {"name": "logits"}}, b"", None, "outputs"),
    ("output parameters a list", "vit",
     {"inputs": [TENSOR_PIXELS], "outputs": [{"name": "logits", "parameters": [1]}]}, b"", None, "parameters"),
    ("binary_data as text", "vit",
     {"inputs": [TENSOR_PIXELS], "outputs": [{"name": "logits", "parameters": {"binary_data": "yes"}}]}, b"", None,
     "binary_data"),
    ("an unknown output", "vit", {"inputs": [TENSOR_PIXELS], "outputs": [{"name": "nope"}]}, b"", None, "nope"),
    ("an output twice", "vit", {"inputs": [TENSOR_PIXELS], "outputs": [{"name": "logits"}] * 2}, b"", None, "twice"),
    ("the classification extension", "vit",
     {"inputs": [TENSOR_PIXELS], "outputs": [{"name": "logits", "parameters": {"classification": 3}}]}, b"", None,
     "classification"),
    ("parameters a list", "vit", {"inputs": [TENSOR_PIXELS], "parameters": [1, 2]}, b"", None, "parameters"),
    ("binary_data_output as text", "vit", {"inputs": [TENSOR_PIXELS], "parameters": {"binary_data_output": "1"}},
     b"", None, "binary_data_output"),
    ("id a number", "vit", {"inputs": [TENSOR_PIXELS], "id": 7}, b"", None, "id"),
    ("id a lone surrogate", "vit", b'{"id": "\\ud800", "inputs": [%s]}' % json.dumps(TENSOR_PIXELS).encode(), b"",
     None, "id"),
    ("a BYTES tail under 4 bytes", "vit_image", {"inputs": [binary(image([""])["inputs"][0], 2)]}, b"\1\0", None,
     "prefix"),
    ("an empty BYTES tensor", "vit_image", image([]), b"", None, "no image"),
    ("an empty binary BYTES tensor", "vit_image", {"inputs": [binary(image([])["inputs"][0], 0)]}, b"", None,
     "no image"),
    ("top_k as text", "vit_image", {**image(["x"]), "parameters": {"top_k": "three"}}, b"", None, "top_k"),
    ("top_k out of range", "vit_image", {**image(["x"]), "parameters": {"top_k": 0}}, b"", None, "top_k"),
    ("a long unknown parameter", "vit_image", {**image(["x"]), "parameters": {"x" * 5000: 1}}, b"", None, "'..."),
    ("many unknown parameters", "vit_image", {**image(["x"]), "parameters": {str(i): 1 for i in range(999)}}, b"",
     None, "; ..."),
    ("a parameter named by a lone surrogate", "vit_image",
     b'{"parameters": {"\\ud800": 1}, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
     b'"data": ["x"]}]}', b"", None, "\\ud800"),
    ("threshold out of range", "detr_image", {**image(["x"]), "parameters": {"threshold": 1.5}}, b"", None,
     "threshold"),
    ("images not 1-D", "vit_image", image(["x"], shape=[1, 1]), b"", None, "shape [n]"),
    ("an image view's unknown input", "vit_image",
     {"inputs": [*image(["x"])["inputs"], {**image(["y"])["inputs"][0], "name": "other"}]}, b"", None, "'image'"),
    ("FP64 1e300 into INT64", "imagetransformer", it_tensors([1e300] * 64, [0], "FP64"), b"", None, "INT64"),
    ("FP64 2.5 into INT64", "imagetransformer", it_tensors([2.5] * 64, [0], "FP64"), b"", None, "INT64"),
    ("JSON nested 100,000 deep", "vit", b"[" * 100_000 + b"]" * 100_000, b"", None, "deep"),
    ("JSON nested past the limit", "vit", b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), b"", None, "deep"),
    ("a NaN literal", "vit", b'{"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1], '
     b'"data": [NaN]}]}', b"", None, "NaN"),
    ("an Infinity literal", "vit", b'{"inputs": [], "id": Infinity}', b"", None, "Infinity"),
    ("a header in UTF-16", "vit", '{"inputs": []}'.encode("utf-16"), b"", None, "JSON"),
    ("a header that is a list", "vit", [TENSOR_PIXELS], b"", None, "object"),
    ("no inputs", "vit", {"inputs": []}, b"", None, "inputs"),
    ("inputs not objects", "vit", {"inputs": ["pixel_values"]}, b"", None, "inputs"),
    ("an input twice", "vit", {"inputs": [TENSOR_PIXELS, TENSOR_PIXELS]}, b"", None, "twice"),
    ("an input without a name", "vit", {"inputs": [{**TENSOR_PIXELS, "name": ""}]}, b"", None, "name"),
    ("an unknown input", "vit", {"inputs": [TENSOR_PIXELS, {**TENSOR_PIXELS, "name": "x"}]}, b"", None, "'x'"),
    ("a missing input", "imagetransformer", {"inputs": it_tensors([0] * 64, [0])["inputs"][:1]}, b"", None,
     "missing"),
    ("unequal batch sizes", "imagetransformer",
     {"inputs": [it_tensors([0] * 64, [0])["inputs"][0], {"name": "labels", "datatype": "INT64", "shape": [2],
                                                           "data": [0, 1]}]}, b"", None, "batch"),
    ("an unknown datatype", "vit", {"inputs": [{**TENSOR_PIXELS, "datatype": "FP8"}]}, b"", None, "datatype"),
    ("a negative dim", "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [-1, 1, 32, 32]}]}, b"", None, "shape"),
    ("a fractional dim", "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [1.5, 1, 32, 32]}]}, b"", None, "shape"),
    ("a dim 1.0", "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [1.0, 1, 32, 32]}]}, b"", None, "shape"),
    ("a dim true", "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [True, 1, 32, 32]}]}, b"", None, "shape"),
    ("a shape past 2**40 with a zero", "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [0, 2**62], "data": []}]},
     b"", None, "2**40"),
    ("rank 33", "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [1] * 33, "data": [0.0]}]}, b"", None, "shape"),
    ("a wrong shape", "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [1, 1, 32, 31], "data": [0.0] * 992}]}, b"",
     None, "[1, 1, 32, 31]"),
    ("more data than the shape", "vit", {"inputs": [{**TENSOR_PIXELS, "data": [0.0] * 1025}]}, b"", None, "1025"),
    ("data nested unlike the shape", "vit",
     {"inputs": [{**TENSOR_PIXELS, "data": [[[0.0] * 32] * 32], "shape": [1, 1, 32, 32]}]}, b"", None, "nested"),
    ("data nested deeper than the shape", "imagetransformer", it_tensors([[[0]] * 64], [0]), b"", None, "deeper"),
    ("data not a list", "vit", {"inputs": [{**TENSOR_PIXELS, "data": 0.0}]}, b"", None, "list"),
    ("no data", "vit", {"inputs": [NO_DATA]}, b"", None, "data"),
    ("data and binary_data_size", "vit", {"inputs": [{**TENSOR_PIXELS, "parameters": {"binary_data_size": 4096}}]},
     b"\0" * 4096, None, "both"),
    ("text as FP32", "vit", {"inputs": [{**TENSOR_PIXELS, "data": ["0"] * 1024}]}, b"", None, "numbers"),
    ("true as FP32", "vit", {"inputs": [{**TENSOR_PIXELS, "data": [True] * 1024}]}, b"", None, "numbers"),
    ("null as FP32", "vit", {"inputs": [{**TENSOR_PIXELS, "data": [None] * 1024}]}, b"", None, "numbers"),
    ("1e39 as FP32", "vit", {"inputs": [{**TENSOR_PIXELS, "data": [1e39] * 1024}]}, b"", None, "too large"),
    ("1e400 (infinity) as FP32", "vit", b'{"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1], '
     b'"data": [1e400]}]}', b"", None, "too large"),
    ("10**400 as FP64", "vit", {"inputs": [{**TENSOR_PIXELS, "datatype": "FP64", "data": [10**400] * 1024}]},
     b"", None, "too large"),
    ("70000 as FP16", "vit", {"inputs": [{**TENSOR_PIXELS, "datatype": "FP16", "data": [7e4] * 1024}]}, b"", None,
     "too large"),
    ("a fraction as INT64", "imagetransformer", it_tensors([0.5] * 64, [0]), b"", None, "integers"),
    ("2**63 as INT64", "imagetransformer", it_tensors([2**63] * 64, [0]), b"", None, "outside"),
    ("-1 as UINT8", "imagetransformer", it_tensors([-1] * 64, [0], "UINT8"), b"", None, "outside"),
    ("1 as BOOL", "imagetransformer", it_tensors([1] * 64, [0], "BOOL"), b"", None, "true or false"),
    ("true as INT64", "imagetransformer", it_tensors([True] * 64, [0]), b"", None, "integers"),
    ("an index out of the manifest's range", "imagetransformer", it_tensors([17] * 64, [0]), b"", None, "outside"),
    ("binary_data_size past the body", "vit", {"inputs": [binary(NO_DATA, 10**9)]}, b"\0" * 16, None, "within"),
    ("binary_data_size under the data", "vit", {"inputs": [binary(NO_DATA, 4092)]}, b"\0" * 4096, None, "4092"),
    ("binary_data_size as text", "vit", {"inputs": [binary(NO_DATA, "4096")]}, b"\0" * 4096, None, "within"),
    ("bytes no input claims", "vit", {"inputs": [binary(NO_DATA, 4096)]}, b"\0" * 4100, None, "no input"),
    ("a tail with JSON inputs", "vit", {"inputs": [TENSOR_PIXELS]}, b"\0", None, "no input"),
    ("two tensors claiming the same bytes", "imagetransformer",
     {"inputs": [binary(it_tensors([0] * 64, [0])["inputs"][0], 512),
                 binary(it_tensors([0] * 64, [0])["inputs"][1], 8)]}, b"\0" * 512, None, "within"),
    ("a BYTES length prefix 0xFFFFFFFF", "vit_image", {"inputs": [binary(image([""])["inputs"][0], 8)]},
     b"\xff" * 4 + b"abcd", None, "runs past"),
    ("more BYTES elements than the shape", "vit_image", {"inputs": [binary(image([""])["inputs"][0], 8)]},
     b"\0" * 8, None, "more than 1"),
    ("BOOL bytes other than 0 and 1", "imagetransformer",
     {"inputs": [binary({"name": "labels", "datatype": "BOOL", "shape": [1]}, 1)]}, b"\2", None, "0 or 1"),
    ("a negative header length", "vit", {"inputs": [TENSOR_PIXELS]}, b"", "-5", HEADER_WORD),
    ("a header length past the body", "vit", {"inputs": [TENSOR_PIXELS]}, b"", "999999", HEADER_WORD),
    ("a header length in hex", "vit", {"inputs": [TENSOR_PIXELS]}, b"", "0x10", HEADER_WORD),
    ("a header length of 5,000 digits", "vit", {"inputs": [TENSOR_PIXELS]}, b"", "9" * 5000, HEADER_WORD),
    ("a header length with a sign", "vit", {"inputs": [TENSOR_PIXELS]}, b"", "+1", HEADER_WORD),
]  # fmt: skip


@pytest.mark.parametrize(("what", "model", "header", "tail", "length", "word"), CASES, ids=[c[0] for c in CASES])
def test_malformed_requests_are_400_saying_why(
    client: TestClient, what: str, model: str, header: Any, tail: bytes, length: str | None, word: str
) -> None:
    response = post(client, model, header, tail, length)
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error"} and word in body["error"] and len(body["error"]) < 300, body


def test_bad_requests_never_fail_their_neighbours(client: TestClient) -> None:
    """Every case above at once, among as many valid requests that share their batches: each bad one
    fails alone, every valid one is answered."""
    valid = {"inputs": [TENSOR_PIXELS]}
    jobs = [job for c in CASES for job in ((c[1], c[2], c[3], c[4]), ("vit", valid, b"", None))]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda job: post(client, *job).status_code, jobs))
    assert statuses[0::2] == [400] * len(CASES) and statuses[1::2] == [200] * len(CASES)


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v2/models/nope/infer", 404),
        ("/v2/models/vit/versions/2/infer", 404),
        ("/v2/models/vit_image_image/infer", 404),
    ],
)
def test_unknown_models_and_versions_are_404(client: TestClient, path: str, status: int) -> None:
    response = client.post(path, json={"inputs": [TENSOR_PIXELS]})
    assert response.status_code == status and set(response.json()) == {"error"}


@pytest.fixture(scope="module")
def small_limits() -> Iterator[TestClient]:
    yield from client_for(Settings(model_repository=SHIPPED_REPOSITORY, device="cpu", warmup=False,
                                   max_body_bytes=50_000, max_images_per_request=2))  # fmt: skip


def test_a_body_over_the_limit_is_413(small_limits: TestClient) -> None:
    body = {"inputs": [{**TENSOR_PIXELS, "shape": [20, 1, 32, 32], "data": [0.0] * 20 * 1024}]}
    assert post(small_limits, "vit", body).status_code == 413


def test_more_images_than_the_limit_is_400(small_limits: TestClient) -> None:
    response = post(small_limits, "vit_image", image(["a", "b", "c"]))
    assert response.status_code == 400 and "limit is 2" in response.json()["error"]


def test_nan_answers_are_null_not_bare_nan(client: TestClient) -> None:
    """NaN pixels in (binary floats may be NaN), NaN logits out: null in the JSON, as KServe writes it."""
    response = post(client, "vit", {"inputs": [binary(NO_DATA, 4096)]}, np.full(1024, np.nan, np.float32).tobytes())
    assert response.status_code == 200
    (logits,) = json.loads(response.text, parse_constant=lambda name: pytest.fail(f"bare {name} in JSON"))["outputs"]
    assert logits["data"] == [None] * 10


def test_an_empty_batch_is_an_empty_answer(client: TestClient) -> None:
    response = post(client, "vit", {"inputs": [{**TENSOR_PIXELS, "shape": [0, 1, 32, 32], "data": []}]})
    assert response.status_code == 200 and response.json()["outputs"][0]["shape"] == [0, 10]


def test_nested_data_and_every_input_datatype_that_fits_are_accepted(client: TestClient) -> None:
    """Data nested as the shape, and integers sent as UINT8 or FP32 where the graph takes INT64."""
    nested = it_tensors([list(range(8))] * 8, [3])
    nested["inputs"][0]["shape"] = [1, 8, 8]
    assert post(client, "imagetransformer", nested).status_code == 400  # rank 3: the graph takes [batch, 64]
    for datatype in ("UINT8", "INT32", "FP32", "FP64"):
        body = it_tensors([[1] * 64], [3], datatype)
        assert post(client, "imagetransformer", body).status_code == 200, datatype


def test_outputs_can_be_chosen_and_sent_binary(client: TestClient) -> None:
    pixels = {"name": "pixels", "datatype": "INT64", "shape": [1, 64], "parameters": {"binary_data_size": 512}}
    labels = {"name": "labels", "datatype": "INT64", "shape": [1], "data": [3]}
    header = {"inputs": [pixels, labels], "outputs": [{"name": "log_likelihood", "parameters": {"binary_data": True}}]}
    response = post(client, "imagetransformer", header, np.zeros(64, np.int64).tobytes())
    result = triton.InferResult.from_response_body(
        response.content, header_length=int(response.headers["Inference-Header-Content-Length"])
    )
    assert result.as_numpy("log_likelihood").shape == (1,) and result.get_output("logits") is None


def test_strings_in_json_round_trip_through_a_bytes_view(client: TestClient) -> None:
    """A JSON BYTES item is text, sent as UTF-8: a non-image string is refused as an image (never a 500)."""
    response = post(client, "vit_image", image(["é"]))
    assert response.status_code == 400 and set(response.json()) == {"error"}


def test_an_over_long_name_comes_back_cut(client: TestClient) -> None:
    response = post(client, "vit", {"inputs": [{**TENSOR_PIXELS, "name": "x" * 100_000}]})
    assert response.status_code == 400 and len(response.json()["error"]) < 300
