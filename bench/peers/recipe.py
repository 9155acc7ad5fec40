"""What every peer runs, written the way a user would with Pillow, numpy and a default onnxruntime
session: the manifest's preprocessing (full decode, colour mode, Pillow resize or letterbox, mean/std),
softmax top-5, and DETR's boxes. Only numpy, Pillow and onnxruntime, since it runs in each peer's venv;
the figures must match the service's own to about 1e-6, which `bench.peers` checks before timing."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

MODELS = Path(__file__).resolve().parents[2] / "model_repository"
FILTERS = {"nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR,
           "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}  # fmt: skip


@dataclass
class Model:
    session: ort.InferenceSession
    prep: dict[str, Any]
    labels: list[str]

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.session.get_inputs()[0].name: batch})


def manifest(name: str) -> dict[str, Any]:
    return dict(json.loads((MODELS / name / "1" / "manifest.json").read_text()))


def load(name: str) -> Model:
    """ONNX Runtime with its defaults (CPU provider, ORT's own thread counts), as a user would open it."""
    spec = manifest(name)
    model_file = MODELS / name / "1" / spec["graphs"]["main"]["file"]
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return Model(session, spec["preprocessing"], spec["labels"])


def fit(image: Image.Image, prep: dict[str, Any]) -> Image.Image:
    """Convert and resize by the manifest: stretched to the input size, or letterboxed (top left, padded)."""
    image = image.convert(prep["color_mode"])
    height, width = prep["size"]
    if prep["resize"] != "letterbox":
        return image.resize((width, height), FILTERS[prep["resample"]])
    scale = min(width / image.width, height / image.height)
    inner = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = Image.new(prep["color_mode"], (width, height), (prep["fill"],) * len(prep["mean"]))
    canvas.paste(image.resize(inner, FILTERS[prep["resample"]]), (0, 0))
    return canvas


def pixels(data: bytes, prep: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image -> (model input `[C, H, W]` float32, original (width, height)), by a full decode."""
    image = Image.open(io.BytesIO(data))
    array = np.asarray(fit(image, prep), dtype=np.float32) / 255
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    mean = np.asarray(prep["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(prep["std"], dtype=np.float32)[:, None, None]
    return (array - mean) / std, image.size


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def top_k(logits: np.ndarray, labels: list[str], k: int = 5) -> list[dict[str, Any]]:
    """One image's logits `[classes]` -> its k best labels with softmax scores."""
    probs = softmax(logits.astype(np.float64))
    return [{"label": labels[i], "score": float(probs[i])} for i in np.argsort(-probs, kind="stable")[:k]]


def detections(
    logits: np.ndarray, boxes: np.ndarray, size: tuple[int, int], model: Model, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """One image: logits `[queries, classes + 1]` and boxes `[queries, 4]` (cx, cy, w, h relative to
    the letterboxed input) -> labelled boxes in original pixels scoring at least `threshold`, best first."""
    probs = softmax(logits.astype(np.float64))[:, :-1]
    keep = np.flatnonzero(probs.max(-1) >= threshold)
    keep = keep[np.argsort(-probs.max(-1)[keep], kind="stable")]
    height, width = model.prep["size"]
    scale = min(width / size[0], height / size[1])  # the letterbox's scale, input pixels per original pixel
    found = []
    for q in keep:
        cx, cy, w, h = boxes[q].astype(np.float64) * [width, height, width, height] / scale
        box = [
            max(0.0, min(v, limit))
            for v, limit in zip((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), size * 2, strict=True)
        ]
        found.append({"label": model.labels[int(probs[q].argmax())], "score": float(probs[q].max()),
                      "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True))})  # fmt: skip
    return found
