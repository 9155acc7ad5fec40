"""Everything else works for imported models: attention routes (rollout over CLS and DeiT's distillation
token or DINOv2's registers; DETR's and Conditional DETR's per-query cross-attention and YOLOS's detection
tokens' attention, on each image's own grid; Swin's refused with the reason), /v2 raw and image views,
/v1/models."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import httpx2
import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image

from service.attention import rollout
from tests.hf.conftest import CLASSIFIERS, DETECTORS
from tests.hf.photos import decoded, photos

JPEG = {"content-type": "image/jpeg"}
PREFIX = {"hfdeit": 2, "hfdeitteacher": 2, "hfdinov2reg": 3}  # tokens before the patches (CLS alone elsewhere)
MAPPED = [model for model in CLASSIFIERS if model != "hfswin"]  # Swin's windows give no map


def transformers_attention(pipe: Any, data: bytes, **kwargs: Any) -> Any:
    import torch

    folder = pipe.model.config._name_or_path  # the same local folder, with attention probabilities to give
    model = type(pipe.model).from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()
    with torch.no_grad():
        inputs = pipe.image_processor(images=decoded(data), return_tensors="pt")
        return model(**inputs, output_attentions=True, **kwargs)


@pytest.mark.parametrize("model", MAPPED)
def test_rollout_equals_transformers_attention(hf_server: str, hf_pipelines: dict[str, Any], model: str) -> None:
    """The map is the CLS row of the rollout over every token (DeiT's distillation token and DINOv2's
    registers included) of transformers' own attention probabilities, over the patches only."""
    data = photos()["china.jpeg"]
    response = httpx2.post(f"{hf_server}/v1/classify/attention?model={model}", content=data, headers=JPEG, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    prefix = PREFIX.get(model, 1)
    attentions = transformers_attention(hf_pipelines[model], data).attentions
    stacked = np.stack([a[0].numpy() for a in attentions])  # [layers, heads, tokens, tokens]
    expected = rollout(stacked)[0, prefix:].reshape(4, 4)
    assert answer["grid"] == [4, 4]
    np.testing.assert_allclose(answer["results"][0]["map"], expected, atol=1e-5)
    top = httpx2.post(f"{hf_server}/v1/classify?model={model}&top_k=1", content=data, headers=JPEG).json()
    assert answer["results"][0]["label"] == top["results"][0][0]["label"]
    png = httpx2.post(f"{hf_server}/v1/classify/attention?model={model}&render=true", content=data, headers=JPEG)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_swin_attention_is_refused_with_the_reason(hf_server: str) -> None:
    data = photos()["china.jpeg"]
    response = httpx2.post(f"{hf_server}/v1/classify/attention?model=hfswin", content=data, headers=JPEG, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "no_attention_graph" and "shifted local windows" in error["message"]
    assert httpx2.post(f"{hf_server}/v1/classify?model=hfswin", content=data, headers=JPEG).status_code == 200


def expected_attention(model: str, out: Any) -> tuple[np.ndarray, list[int]]:
    """From transformers' outputs: each query's attention over the feature cells (last layer, heads
    averaged), and the queries of the detections at 0.3, best first. YOLOS's queries are its detection
    tokens, its cells its patches; Conditional DETR scores every query and label by a sigmoid."""
    if model == "hfyolos":
        cross = out.attentions[-1][0].mean(0)[-10:, 1:-10].numpy()
    else:
        cross = out.cross_attentions[-1][0].mean(0).numpy()
    if model == "hfcondetr":
        scores = out.logits[0].sigmoid().flatten().numpy()
        return cross, [p // out.logits.shape[-1] for p in np.argsort(-scores, kind="stable") if scores[p] >= 0.3]
    scores = out.logits[0].softmax(-1)[:, :-1].max(-1).values.numpy()
    return cross, [q for q in np.argsort(-scores, kind="stable") if scores[q] >= 0.3]


@pytest.mark.parametrize("model", DETECTORS)
def test_detection_attention_on_each_images_own_grid(hf_server: str, hf_pipelines: dict[str, Any], model: str) -> None:
    names = ["china.jpeg", "portrait.jpeg"]
    files = [("file", (name, photos()[name], "image/jpeg")) for name in names]
    response = httpx2.post(f"{hf_server}/v1/detect/attention?model={model}&threshold=0.3&point=100,100",
                           files=files, timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    answer = response.json()
    grids = []
    for name, result in zip(names, answer["results"], strict=True):
        image = decoded(photos()[name])
        out = transformers_attention(hf_pipelines[model], photos()[name])
        inputs = hf_pipelines[model].image_processor(images=image, return_tensors="pt")
        _, _, height, width = inputs["pixel_values"].shape
        rows, cols = math.ceil(height / 8), math.ceil(width / 8)  # a feature cell: 8 pixels (stride or patch)
        grids.append([rows, cols])
        cross, queries = expected_attention(model, out)
        assert len(result["detections"]) == len(queries) > 0
        for detection, q in zip(result["detections"], queries, strict=True):
            np.testing.assert_allclose(detection["attention"], cross[q].reshape(rows, cols), atol=1e-5)
        assert np.asarray(result["encoder"]["map"]).shape == (rows, cols)
    assert answer["grid"] == grids[0]  # DETR: china 427x640 -> 64x95 input -> 8x12 cells of 8 pixels
    png = httpx2.post(f"{hf_server}/v1/detect/attention?model={model}&threshold=0.9&render=true",
                      content=photos()["wide.jpeg"], headers=JPEG, timeout=60)  # fmt: skip
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_v2_views_and_models(hf_server: str) -> None:
    client = triton.InferenceServerClient(hf_server.removeprefix("http://"))
    names = ["china.jpeg", "flower.png"]
    images = triton.InferInput("image", [len(names)], "BYTES")
    images.set_data_from_numpy(np.array([photos()[n] for n in names], dtype=object))
    result = client.infer("hfdeit_image", [images], parameters={"top_k": 3})
    for name, labels in zip(names, result.as_numpy("label"), strict=True):
        kind = "image/jpeg" if name.endswith("jpeg") else "image/png"
        v1 = httpx2.post(f"{hf_server}/v1/classify?model=hfdeit&top_k=3", content=photos()[name],
                         headers={"content-type": kind}).json()  # fmt: skip
        assert [label.decode() for label in labels] == [p["label"] for p in v1["results"][0]]
    (found, _) = client.infer("hfdetr_image", [images]).as_numpy("detections")
    assert json.loads(found) == httpx2.post(f"{hf_server}/v1/detect?model=hfdetr", content=photos()["china.jpeg"],
                                            headers=JPEG).json()["results"][0]  # fmt: skip
    metadata = client.get_model_metadata("hfdetr")
    assert metadata["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, -1, -1]}]
    raw = triton.InferInput("pixel_values", [1, 3, 32, 32], "FP32")
    raw.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
    assert client.infer("hfvit", [raw]).as_numpy("logits").shape == (1, 7)
    models = {m["name"]: m for m in httpx2.get(f"{hf_server}/v1/models").json()["models"]}
    assert {name: m["architecture"] for name, m in models.items()} == {
        "hfvit": "ViTForImageClassification", "hfdeit": "DeiTForImageClassification",
        "hfdeitteacher": "DeiTForImageClassificationWithTeacher", "hfdetr": "DetrForObjectDetection",
        "hfbeit": "BeitForImageClassification", "hfswin": "SwinForImageClassification",
        "hfdinov2": "Dinov2ForImageClassification", "hfdinov2reg": "Dinov2WithRegistersForImageClassification",
        "hfyolos": "YolosForObjectDetection", "hfcondetr": "ConditionalDetrForObjectDetection",
    }  # fmt: skip
    assert all(m["state"] == "ready" for m in models.values())


def test_free_axes_of_a_raw_detr_tensor_are_bounded(hf_server: str) -> None:
    """The raw view of a detector that keeps each image's size takes height and width of at least 1
    and at most its preprocessing's longest side: a 1 x 400,000 tensor (5 MB) took 5 GB, and a zero
    height gave 500."""
    metadata = httpx2.get(f"{hf_server}/v2/models/hfdetr").json()
    assert metadata["inputs"][0]["shape"] == [-1, 3, -1, -1]
    for height, width, status in ((1, 400_000, 400), (0, 64, 400), (64, 0, 400), (2, 64, 200)):
        tensor = np.zeros((1, 3, height, width), dtype=np.float32)
        body = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(tensor.shape),
                            "parameters": {"binary_data_size": tensor.nbytes}}]}  # fmt: skip
        header = json.dumps(body).encode()
        response = httpx2.post(f"{hf_server}/v2/models/hfdetr/infer", content=header + tensor.tobytes(),
                               headers={"Inference-Header-Content-Length": str(len(header))}, timeout=60)  # fmt: skip
        assert response.status_code == status, (height, width, response.text[:200])
        if status == 400:
            assert "axis" in response.json()["error"]


def test_a_very_long_thin_image_is_detected_not_500(hf_server: str) -> None:
    """transformers' size arithmetic gives a short side of 0 past about 192:1 (and fails); the
    service keeps it at 1 pixel."""
    for size in ((192, 1), (1, 193), (20_000, 100)):
        out = io.BytesIO()
        Image.new("RGB", size, (120, 80, 40)).save(out, format="PNG")
        response = httpx2.post(f"{hf_server}/v1/detect?model=hfdetr", content=out.getvalue(),
                               headers={"content-type": "image/png"}, timeout=60)  # fmt: skip
        assert response.status_code == 200, (size, response.text[:200])
