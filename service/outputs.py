"""What the built-in tasks' graph outputs mean, as numbers: softmax over logits, DETR's detections
in original-image pixels, generated levels as a grey image. Shared by the tasks and by export's
evaluation (which must score exactly what the service answers)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from service.imaging import resized_size
from service.manifest import Preprocessing, ScoreActivation


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs


class Found(NamedTuple):
    """One image's detections, best first."""

    boxes: np.ndarray  # [n, 4] x0 y0 x1 y1 in original pixels
    scores: np.ndarray  # [n]
    labels: np.ndarray  # [n] class indices
    queries: np.ndarray  # [n] the object queries they came from


def detections(
    logits: np.ndarray,
    boxes: np.ndarray,
    original: tuple[int, int],
    spec: Preprocessing,
    threshold: float,
    limit: int,
    activation: ScoreActivation = "softmax",
) -> Found:
    """One image: logits `[queries, classes (+ 1)]`, boxes `[queries, 4]` (cx, cy, w, h relative to the
    input) -> the detections scoring at least `threshold`, at most `limit`, best first."""
    queries, labels, scores = best_scores(logits, threshold, limit, activation)
    cx, cy, w, h = boxes[queries].astype(np.float64).T
    corners = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)
    if not spec.fixed_size:  # the input is the whole image, unpadded: as transformers, no clipping
        return Found(corners * ([original[0], original[1]] * 2), scores, labels, queries)
    height, width = spec.size
    xyxy = corners * [width, height, width, height]
    # input pixels -> original pixels, through the letterbox's per-axis scale
    scale_x, scale_y = input_scale(original, spec)
    xyxy = np.clip(xyxy / np.array([scale_x, scale_y] * 2), 0, [original[0], original[1]] * 2)
    return Found(xyxy, scores, labels, queries)


def best_scores(
    logits: np.ndarray, threshold: float, limit: int, activation: ScoreActivation
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries, labels, scores) scoring at least `threshold`, at most `limit`, best first. softmax: the
    last class is "no object", each query gives its best label (DETR, YOLOS). sigmoid: each query and
    label is scored alone and the best pairs are kept, so that a query may give several labels (as
    transformers' Conditional DETR post-processing, whose top-k runs over every pair)."""
    if activation == "sigmoid":
        flat = (1 / (1 + np.exp(-logits.astype(np.float64)))).ravel()
        pairs = np.flatnonzero(flat >= threshold)
        pairs = pairs[np.argsort(-flat[pairs], kind="stable")][:limit]
        queries, labels = np.divmod(pairs, logits.shape[-1])
        return queries, labels, flat[pairs]
    probs = softmax(logits.astype(np.float64))[:, :-1]
    best, top = probs.argmax(-1), probs.max(-1)
    queries = np.flatnonzero(top >= threshold)
    queries = queries[np.argsort(-top[queries], kind="stable")][:limit]
    return queries, best[queries], top[queries]


def input_scale(original: tuple[int, int], spec: Preprocessing) -> tuple[float, float]:
    """Model-input pixels per original pixel, along x and y."""
    inner_w, inner_h = resized_size(*original, spec)
    return inner_w / original[0], inner_h / original[1]


def levels_to_image(levels: np.ndarray, count: int, scale: int = 1) -> Image.Image:
    """`[height, width]` levels in [0, count) -> an 8-bit greyscale image, enlarged `scale` times."""
    grey = np.round(levels * (255 / (count - 1))).astype(np.uint8)
    if scale > 1:
        grey = grey.repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(grey, mode="L")
