"""End to end: a real `python -m service` process on a free port, classifying every held-out digit
sent as a PNG over HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx2
import numpy as np

from export.coco import coco_detections, coco_map, load_coco
from export.data import load_digits_data
from export.scenes import SceneConfig, write_coco
from tests.helpers import held_out_digits, png_bytes


def test_every_held_out_digit_over_http(server: str) -> None:
    images, labels = held_out_digits()
    correct = 0
    with httpx2.Client(base_url=server, timeout=30) as http:
        for image, label in zip(images, labels, strict=True):
            response = http.post("/v1/classify", files={"file": ("digit.png", png_bytes(image), "image/png")})
            assert response.status_code == 200, response.text
            top = response.json()["results"][0]
            assert len(top) == 5
            correct += top[0]["label"] == str(label)
    accuracy = correct / len(labels)
    print(f"held-out accuracy over HTTP: {accuracy:.4f} ({correct}/{len(labels)})")
    assert len(labels) >= 250
    assert accuracy >= 0.98  # measured 0.9861 (355/360)


def test_models_report_providers_over_http(server: str) -> None:
    models = httpx2.get(f"{server}/v1/models").json()["models"]
    assert {m["name"]: m["providers"] for m in models} == {
        "detr": ["CPUExecutionProvider"],
        "imagetransformer": ["CPUExecutionProvider"],
        "vit": ["CPUExecutionProvider"],
    }


def test_detection_map_over_http(server: str, tmp_path: Path) -> None:
    """COCO mAP (IoU .5, .75 and .5:.95) of the HTTP answers on 200 held-out scenes (digits the
    detector never trained on)."""
    data = load_digits_data(seed=0)
    annotations = write_coco(tmp_path, data.held_out, data.classes, 200, seed=1, cfg=SceneConfig(), desc="scenes")
    scenes = load_coco(annotations)
    found = []
    with httpx2.Client(base_url=server, timeout=30) as http:
        for i, image in enumerate(scenes.images):
            png = png_bytes(image)
            response = http.post("/v1/detect?threshold=0.05", files={"file": ("scene.png", png, "image/png")})
            assert response.status_code == 200, response.text
            (result,) = response.json()["results"]
            boxes = np.array([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in result]).reshape(-1, 4)
            labels = np.array([scenes.classes.index(d["label"]) for d in result], dtype=np.int64)
            found += coco_detections(scenes, i, boxes, np.array([d["score"] for d in result]), labels)
    figures = coco_map(annotations, found)
    print(f"detection over HTTP, 200 held-out scenes: {figures}")
    # measured mAP@.5 0.991, mAP@.75 0.974, mAP@[.5:.95] 0.786
    assert figures["map50"] >= 0.98 and figures["map75"] >= 0.95 and figures["map"] >= 0.77
