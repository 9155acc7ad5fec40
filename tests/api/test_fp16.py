"""A graph exported in float16 (inputs and outputs too) serves everywhere: the service feeds every
graph the dtypes its manifest declares (routes, batcher, sampler, warm-up, /v2), and its stages
after the graph compute in float32. ONNX Runtime's CPU provider runs these fp16 graphs, so this runs
in CI the code a GPU would."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnxruntime.transformers.float16 import convert_float_to_float16

from service.settings import Settings
from tests.conftest import SHIPPED_REPOSITORY, client_for
from tests.helpers import held_out_digits, png_bytes


def to_fp16(version_dir: Path) -> None:
    """Every graph and every float tensor of the manifest in float16."""
    manifest_path = version_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for graph in manifest["graphs"].values():
        path = version_dir / graph["file"]
        onnx.save(convert_float_to_float16(onnx.load(path), keep_io_types=False), path)
        for tensor in graph["inputs"] + graph["outputs"]:
            tensor["dtype"] = "float16" if tensor["dtype"] == "float32" else tensor["dtype"]
    manifest_path.write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def fp16_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("fp16")
    for name in ("vit", "imagetransformer"):
        shutil.copytree(SHIPPED_REPOSITORY / name, root / name)
        to_fp16(root / name / "1")
    yield from client_for(Settings(model_repository=root, device="cpu"))


def test_an_fp16_model_loads_and_classifies_as_the_fp32_one(fp16_client: TestClient, client: TestClient) -> None:
    assert fp16_client.get("/health/ready").status_code == 200
    digits, labels = held_out_digits()
    files = [("file", (f"{i}.png", png_bytes(d), "image/png")) for i, d in enumerate(digits[:16])]
    half = fp16_client.post("/v1/classify", files=files)
    full = client.post("/v1/classify", files=files)
    assert half.status_code == 200, half.text
    assert [r[0]["label"] for r in half.json()["results"]] == [r[0]["label"] for r in full.json()["results"]]
    attention = fp16_client.post("/v1/classify/attention", files=files[:1])
    assert attention.status_code == 200 and len(attention.json()["results"][0]["map"]) == 8


def test_v2_takes_and_answers_fp16_as_declared(fp16_client: TestClient) -> None:
    metadata = fp16_client.get("/v2/models/vit").json()
    assert metadata["inputs"][0]["datatype"] == "FP16" and metadata["outputs"][0]["datatype"] == "FP16"
    pixels = np.zeros((2, 1, 32, 32), dtype=np.float32).ravel().tolist()
    tensor = {"name": "pixel_values", "datatype": "FP16", "shape": [2, 1, 32, 32], "data": pixels}
    response = fp16_client.post("/v2/models/vit/infer", json={"inputs": [tensor]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["datatype"] == "FP16"
    tensor["datatype"] = "FP32"  # a wider type is cast where its values survive
    assert fp16_client.post("/v2/models/vit/infer", json={"inputs": [tensor]}).status_code == 200


def test_generation_runs_its_fp16_step_graph(fp16_client: TestClient) -> None:
    response = fp16_client.post("/v1/generate", json={"label": "3", "num_images": 2, "seed": 1, "scale": 1})
    assert response.status_code == 200, response.text
    score = fp16_client.post("/v1/score?label=3", content=png_bytes(held_out_digits()[0][0]),
                             headers={"content-type": "image/png"})  # fmt: skip
    assert score.status_code == 200 and 0 < score.json()["results"][0]["bits_per_dim"] < 8
