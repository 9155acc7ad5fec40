"""What the built-in tasks' graph outputs mean, as numbers: softmax over logits, DETR's detections in original-image
pixels, a generation model's tokens as an image (grey levels, or a palette's colours), and an image as its tokens.
Shared by the tasks and by export's evaluation and import checks (which must score exactly what the service answers)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from service.imaging import Decoded, normalize, resized_size, to_unit_array
from service.manifest import GenerationConfig, Preprocessing, ScoreActivation


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


def palette_colours(palette: list[tuple[float, float, float]]) -> np.ndarray:
    """ImageGPT's colour clusters (RGB in [-1, 1]) -> `[clusters, 3]` 8-bit colours, round((c + 1) * 127.5)."""
    return np.clip(np.round((np.asarray(palette, dtype=np.float64) + 1) * 127.5), 0, 255).astype(np.uint8)


def token_values(tokens: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """Tokens `[...]` -> what a pixel shows, 0-255: a grey value `[...]`, or with a palette RGB `[..., 3]`."""
    if cfg.palette is None:
        return np.round(tokens * (255 / (cfg.levels - 1))).astype(np.uint8)
    colours: np.ndarray = palette_colours(cfg.palette)[tokens]
    return colours


def tokens_to_image(tokens: np.ndarray, cfg: GenerationConfig, scale: int = 1) -> Image.Image:
    """`[height, width]` tokens -> an 8-bit image (greyscale, or RGB with a palette), enlarged `scale` times."""
    if cfg.palette is None:
        return levels_to_image(tokens, cfg.levels, scale)
    rgb = token_values(tokens, cfg).repeat(scale, axis=0).repeat(scale, axis=1)
    return Image.fromarray(rgb, mode="RGB")


def image_to_tokens(decoded: Decoded, spec: Preprocessing, cfg: GenerationConfig) -> np.ndarray:
    """A decoded image -> `[height, width]` tokens, resized as the manifest says: grey levels, or
    each pixel's nearest colour of the palette."""
    unit = to_unit_array(decoded.image, spec, decoded.size, decoded.box)
    if cfg.palette is not None:
        return nearest_colours(normalize(unit, spec), cfg.palette)
    levels: np.ndarray = np.round(unit[0] * (cfg.levels - 1)).astype(np.int64)
    return levels


def nearest_colours(pixels: np.ndarray, palette: list[tuple[float, float, float]]) -> np.ndarray:
    """`[3, height, width]` normalized pixels -> `[height, width]` indices of their nearest palette
    colours, computed as ImageGPT's image processor does (|a|^2 - 2ab + |b|^2, float32 pixels against
    float64 clusters, the first of equals): a pixel halfway between two colours gets its token."""
    x = pixels.transpose(1, 2, 0).reshape(-1, 3)
    clusters = np.asarray(palette, dtype=np.float64).T
    d = np.sum(np.square(x), axis=1)[:, None] - 2 * np.matmul(x, clusters) + np.sum(np.square(clusters), axis=0)
    tokens: np.ndarray = np.argmin(d, axis=1).reshape(pixels.shape[1:]).astype(np.int64)
    return tokens
