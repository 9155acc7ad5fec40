"""A bad request never fails another: inputs are checked against the manifest before they join a
batch, so an out-of-range index sent to the raw /v2 view of the Image Transformer fails alone while
valid /v1/score requests share its batches."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image


def _digit_png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _bad_index(level: int) -> dict[str, object]:
    pixels = [0] * 63 + [level]
    return {
        "inputs": [
            {"name": "pixels", "datatype": "INT64", "shape": [1, 64], "data": pixels},
            {"name": "labels", "datatype": "INT64", "shape": [1], "data": [3]},
        ]
    }


def test_an_out_of_range_index_is_refused_before_it_joins_a_batch(client: TestClient) -> None:
    for level, label in ((17, 3), (-1, 3), (16, 10)):
        body = _bad_index(level)
        body["inputs"][1]["data"] = [label]  # type: ignore[index]
        response = client.post("/v2/models/imagetransformer/infer", json=body)
        assert response.status_code == 400, response.text
        assert "outside" in response.json()["error"]


def test_bad_neighbours_do_not_fail_valid_requests_in_the_same_batches(client: TestClient) -> None:
    good = [("file", ("d.png", _digit_png(v), "image/png")) for v in (0, 120, 255)]

    def valid(_: int) -> int:
        return client.post("/v1/score?label=4", files=good).status_code

    def hostile(i: int) -> int:
        return client.post("/v2/models/imagetransformer/infer", json=_bad_index(10**6 + i)).status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(valid if i % 2 else hostile, i) for i in range(120)]
        statuses = [f.result() for f in futures]
    assert statuses[1::2] == [200] * 60
    assert statuses[0::2] == [400] * 60
