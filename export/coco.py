"""COCO-format detection data: a reader (for the generated scenes and for a user's own data set) and
evaluation with pycocotools, the reference COCO evaluator."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from service.imaging import decode_image


@dataclass
class CocoData:
    annotations: Path
    classes: list[str]  # category names, in category-id order; the model's class index is the position
    category_ids: list[int]
    image_ids: list[int]
    images: list[Image.Image]
    boxes: list[np.ndarray]  # per image `[n, 4]` x0 y0 x1 y1 in pixels
    labels: list[np.ndarray]  # per image `[n]` class indices


def load_coco(annotations: Path, images_dir: Path | None = None) -> CocoData:
    """Reads `annotations` (COCO JSON) and its images (default: `images/` beside it). Crowd boxes are skipped."""
    images_dir = images_dir or annotations.parent / "images"
    coco = json.loads(annotations.read_text())
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    index_of = {c["id"]: i for i, c in enumerate(categories)}
    per_image: dict[int, list[dict[str, Any]]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            per_image[ann["image_id"]].append(ann)
    data = CocoData(annotations, [c["name"] for c in categories], [c["id"] for c in categories], [], [], [], [])
    for img in coco["images"]:
        anns = per_image[img["id"]]
        xywh = np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        data.image_ids.append(img["id"])
        data.images.append(decode_image((images_dir / img["file_name"]).read_bytes(), max_pixels=10**9))
        data.boxes.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
        data.labels.append(np.asarray([index_of[a["category_id"]] for a in anns], dtype=np.int64))
    return data


def coco_detections(
    data: CocoData, image_index: int, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> list[dict[str, Any]]:
    """One image's detections (xyxy pixel boxes, class indices) in COCO's result format."""
    return [
        {
            "image_id": data.image_ids[image_index],
            "category_id": data.category_ids[int(label)],
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "score": float(score),
        }
        for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels, strict=True)
    ]


def coco_map(annotations: Path, detections: list[dict[str, Any]]) -> dict[str, float]:
    """mAP@[.5:.95], mAP@.5 and mAP@.75 of `detections` against `annotations`, by pycocotools."""
    if not detections:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO(str(annotations))
        evaluation = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    return {"map": float(stats[0]), "map50": float(stats[1]), "map75": float(stats[2])}
