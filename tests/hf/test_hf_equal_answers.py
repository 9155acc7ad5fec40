"""Issue 14: imported Hugging Face models answer over HTTP as transformers' pipelines do on the same
decoded image: the same labels in the same order, scores within 1e-3, boxes within 1 pixel."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import pytest

from tests.hf.conftest import CLASSIFIERS, DETECTORS
from tests.hf.photos import decoded, photos

SCORE_TOLERANCE = 1e-3
BOX_TOLERANCE = 1.0
THRESHOLD = 0.3


def media_type(name: str) -> str:
    return "image/jpeg" if name.endswith(".jpeg") else "image/png"


@pytest.mark.parametrize("model", CLASSIFIERS)
def test_classification_equals_the_pipeline(hf_server: str, hf_pipelines: dict[str, Any], model: str) -> None:
    worst = 0.0
    for name, data in photos().items():
        response = httpx2.post(f"{hf_server}/v1/classify?model={model}&top_k=5", content=data,
                               headers={"content-type": media_type(name)}, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        (ours,) = response.json()["results"]
        theirs = hf_pipelines[model](decoded(data), top_k=5)
        assert [p["label"] for p in ours] == [p["label"] for p in theirs], name
        worst = max(worst, *(abs(a["score"] - b["score"]) for a, b in zip(ours, theirs, strict=True)))
        assert theirs[0]["score"] - theirs[-1]["score"] > 0.05  # scores spread enough for the order to mean something
    print(f"{model}: largest score difference against transformers' pipeline {worst:.2e}")
    assert worst <= SCORE_TOLERANCE


def assert_same_detections(ours: list[dict[str, Any]], theirs: list[dict[str, Any]], name: str) -> tuple[float, float]:
    """Both best first (the pipeline answers in query order); returns the largest score and box differences."""
    theirs = sorted(theirs, key=lambda d: -d["score"])
    assert [d["label"] for d in ours] == [d["label"] for d in theirs], name
    score, box = 0.0, 0.0
    for a, b in zip(ours, theirs, strict=True):
        score = max(score, abs(a["score"] - b["score"]))
        box = max(box, *(abs(a["box"][k] - b["box"][k]) for k in ("xmin", "ymin", "xmax", "ymax")))
    assert score <= SCORE_TOLERANCE and box <= BOX_TOLERANCE, name
    return score, box


def float_box_difference(pipe: Any, image: Any, ours: list[dict[str, Any]]) -> float:
    """The pipeline rounds boxes down to whole pixels; its image processor's post-processing gives them
    as floats: the largest difference from ours, best first on both sides."""
    import torch

    with torch.no_grad():
        outputs = pipe.model(**pipe.image_processor(images=image, return_tensors="pt"))
    (raw,) = pipe.image_processor.post_process_object_detection(outputs, THRESHOLD, [(image.height, image.width)])
    order = raw["scores"].argsort(descending=True)
    boxes = raw["boxes"][order].tolist()
    assert len(boxes) == len(ours)
    return max([abs(a["box"][k] - b[i]) for a, b in zip(ours, boxes, strict=True)
                for i, k in enumerate(("xmin", "ymin", "xmax", "ymax"))], default=0.0)  # fmt: skip


@pytest.mark.parametrize("model", DETECTORS)
def test_detection_equals_the_pipeline(hf_server: str, hf_pipelines: dict[str, Any], model: str) -> None:
    """DETR and YOLOS: softmax with a "no object" class; Conditional DETR: sigmoid, top pairs of query and label."""
    found, worst, exact, score = 0, 0.0, 0.0, 0.0
    for name, data in photos().items():
        response = httpx2.post(f"{hf_server}/v1/detect?model={model}&threshold={THRESHOLD}", content=data,
                               headers={"content-type": media_type(name)}, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        (ours,) = response.json()["results"]
        theirs = hf_pipelines[model](decoded(data), threshold=THRESHOLD)
        score_diff, box_diff = assert_same_detections(ours, theirs, name)
        score, worst = max(score, score_diff), max(worst, box_diff)
        exact = max(exact, float_box_difference(hf_pipelines[model], decoded(data), ours))
        found += len(ours)
    print(
        f"{model}: {found} detections, largest score difference {score:.2e}, "
        f"largest box difference against transformers' pipeline {worst:.3f} px "
        f"(its boxes are truncated to whole pixels); against its post-processing's float boxes {exact:.2e} px"
    )
    assert found >= 8  # enough detections for the comparison to mean something


@pytest.mark.parametrize("model", DETECTORS)
def test_detection_batch_of_different_sizes(hf_server: str, hf_pipelines: dict[str, Any], model: str) -> None:
    """One request of photos of different sizes, and concurrent requests that the batcher groups by size."""
    names = ["china.jpeg", "portrait.png", "wide.jpeg", "flower.png"]
    files = [("file", (name, photos()[name], media_type(name))) for name in names]
    response = httpx2.post(f"{hf_server}/v1/detect?model={model}&threshold={THRESHOLD}", files=files, timeout=60)
    assert response.status_code == 200, response.text
    for name, ours in zip(names, response.json()["results"], strict=True):
        assert_same_detections(ours, hf_pipelines[model](decoded(photos()[name]), threshold=THRESHOLD), name)

    async def concurrently() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(base_url=hf_server, timeout=60) as http:
            return await asyncio.gather(*(
                http.post(f"/v1/detect?model={model}&threshold={THRESHOLD}", content=photos()[name],
                          headers={"content-type": media_type(name)})
                for name in names * 4
            ))  # fmt: skip

    for name, answer in zip(names * 4, asyncio.run(concurrently()), strict=True):
        assert answer.status_code == 200, answer.text
        assert_same_detections(answer.json()["results"][0], hf_pipelines[model](decoded(photos()[name]),
                               threshold=THRESHOLD), name)  # fmt: skip
