"""What every peer runs, written the way a user would with Pillow, numpy and an onnxruntime session:
the manifest's preprocessing (full decode, colour mode, Pillow resize or letterbox, or Hugging Face's
shortest-edge resize, mean/std), softmax top-5, and DETR's boxes. Only numpy, Pillow and onnxruntime,
since it runs in each peer's venv; the figures must match the service's own to about 1e-6, which
`bench.peers` checks before timing.

The harness picks the models and the session's settings through the environment: PEER_REPOSITORY (a
model repository, default the shipped one), PEER_MODELS (names, default `vit,detr`), PEER_THREADS
(intra_op_num_threads; unset: ONNX Runtime's default, a thread per physical core) and PEER_SPINNING
(`session.intra_op.allow_spinning`, 0 or 1; unset: ONNX Runtime's default, 1)."""

from __future__ import annotations

import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

SHIPPED = Path(__file__).resolve().parents[2] / "model_repository"
FILTERS = {"nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR,
           "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}  # fmt: skip
ROUTES = {"classification": "classify", "detection": "detect"}  # the manifest's task -> the route serving it


@dataclass
class Model:
    session: ort.InferenceSession
    prep: dict[str, Any]
    labels: list[str]
    task: str  # classify or detect

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.session.get_inputs()[0].name: batch})


def repository() -> Path:
    return Path(os.environ.get("PEER_REPOSITORY", SHIPPED))


def manifest(name: str) -> dict[str, Any]:
    return dict(json.loads((repository() / name / "1" / "manifest.json").read_text()))


def session_options(threads: int | None = None, spinning: str | None = None) -> ort.SessionOptions:
    """ONNX Runtime's defaults, but for the thread count and spinning (0 or 1) asked for, by argument
    or by the environment."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("PEER_THREADS", "0")) if threads is None else threads
    spinning = os.environ.get("PEER_SPINNING") if spinning is None else spinning
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    return options


def load(name: str) -> Model:
    """An ONNX Runtime session on the CPU provider, as a user would open it."""
    spec = manifest(name)
    model_file = repository() / name / "1" / spec["graphs"]["main"]["file"]
    session = ort.InferenceSession(str(model_file), session_options(), providers=["CPUExecutionProvider"])
    return Model(session, spec["preprocessing"], spec["labels"], ROUTES[spec["task"]])


def served() -> dict[str, Model]:
    """The models named in PEER_MODELS, by the route that serves them (classify, detect)."""
    models = [load(name) for name in os.environ.get("PEER_MODELS", "vit,detr").split(",")]
    return {model.task: model for model in models}


def shortest_edge(width: int, height: int, prep: dict[str, Any]) -> tuple[int, int]:
    """Hugging Face's resize (transformers' get_size_with_aspect_ratio): the shorter side to
    `shortest_edge` unless the longer would pass `longest_edge`, then the longer side to that."""
    size, raw, long_cap = prep["shortest_edge"], None, prep["longest_edge"]
    short, long = sorted((width, height))
    if long_cap and long / short * size > long_cap:
        raw = long_cap * short / long
        size = int(round(raw))
    if short == size:
        return width, height
    far = int((raw if raw is not None else size) * long / short)
    return (size, far) if width < height else (far, size)


def fit(image: Image.Image, prep: dict[str, Any]) -> Image.Image:
    """Convert and resize by the manifest: stretched to the input size, letterboxed (top left, padded),
    or by the shortest edge (each image keeping its own size)."""
    image = image.convert(prep["color_mode"])
    height, width = prep["size"]
    if prep["resize"] == "shortest_edge":
        return image.resize(shortest_edge(*image.size, prep), FILTERS[prep["resample"]])
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
    array = np.asarray(fit(image, prep), dtype=np.float32) * np.float32(prep.get("rescale_factor", 1 / 255))
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
    """One image: logits `[queries, classes + 1]` and boxes `[queries, 4]` (cx, cy, w, h relative to the
    input) -> labelled boxes in original pixels scoring at least `threshold`, best first. A letterboxed
    input maps back through the letterbox's scale, clipped to the image; an image resized whole (shortest
    edge) through its own size, unclipped, as transformers does."""
    probs = softmax(logits.astype(np.float64))[:, :-1]
    keep = np.flatnonzero(probs.max(-1) >= threshold)
    keep = keep[np.argsort(-probs.max(-1)[keep], kind="stable")]
    height, width = model.prep["size"]
    whole = model.prep["resize"] == "shortest_edge"
    scale = 1.0 if whole else min(width / size[0], height / size[1])  # input pixels per original pixel
    span = np.array(size * 2 if whole else (width, height) * 2, dtype=np.float64) / scale
    found = []
    for q in keep:
        cx, cy, w, h = boxes[q].astype(np.float64)
        box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * span
        if not whole:
            box = np.clip(box, 0, size * 2)
        found.append({"label": model.labels[int(probs[q].argmax())], "score": float(probs[q].max()),
                      "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), box.tolist(), strict=True))})  # fmt: skip
    return found


def answer(model: Model, outputs: list[np.ndarray], size: tuple[int, int]) -> list[dict[str, Any]]:
    """One image's outputs -> its answer: top-5 labels, or its detections."""
    if model.task == "classify":
        return top_k(outputs[0], model.labels)
    return detections(outputs[0], outputs[1], size, model)


def run_each(model: Model, inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Inputs `[C, H, W]` -> each one's outputs, run as one batch per input size (a detector's inputs
    keep their images' sizes, and only inputs of one size stack)."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, x in enumerate(inputs):
        by_shape[x.shape].append(i)
    found: list[list[np.ndarray]] = [[] for _ in inputs]
    for indices in by_shape.values():
        outputs = model.run(np.stack([inputs[i] for i in indices]))
        for row, i in enumerate(indices):
            found[i] = [output[row] for output in outputs]
    return found
