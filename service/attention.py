"""Attention maps: ViT attention rollout (Abnar & Zuidema 2020), and heatmap overlays as PNG."""

from __future__ import annotations

from typing import Literal

import numpy as np
from cmap import Colormap
from PIL import Image

from service.errors import ServiceError

HeadFusion = Literal["mean", "max", "min"]
_VIRIDIS = (Colormap("viridis").lut(256)[:, :3] * 255).round().astype(np.uint8)  # perceptually uniform
_VIRIDIS_PALETTE = _VIRIDIS.tobytes()  # the same, as a palette: grey level i is colour i
BAND_PIXELS = 2**20  # pixels blended at a time


def fuse_heads(attention: np.ndarray, fusion: HeadFusion) -> np.ndarray:
    """`[..., heads, n, n]` -> `[..., n, n]`."""
    fused: np.ndarray = getattr(attention, fusion)(axis=-3)
    return fused


def rollout(attention: np.ndarray, fusion: HeadFusion = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """Attention rollout over `[layers, heads, n, n]` (row = query, each row sums to 1) -> `[n, n]`:
    per layer, fuse the heads, zero the lowest `discard_ratio` of the weights (never a token's
    attention to itself), add the identity (the residual path), renormalise each row, then multiply
    the layers from the first to the last. Row 0 is what the CLS token draws from each input token."""
    n = attention.shape[-1]
    result = np.eye(n)
    for layer in attention.astype(np.float64):
        fused = fuse_heads(layer, fusion)
        if discard_ratio > 0:
            off_diagonal = ~np.eye(n, dtype=bool)
            cutoff = np.quantile(fused[off_diagonal], discard_ratio)
            fused = np.where(off_diagonal & (fused < cutoff), 0.0, fused)
        mixed = fused + np.eye(n)
        mixed /= mixed.sum(axis=-1, keepdims=True)
        result = mixed @ result
    return result


def to_unit(values: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] for display (constant maps become 0)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def heatmap(values: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A `[h, w]` map -> an RGB viridis image of `size` (width, height), smoothly upsampled. The
    colour map is applied as a palette, inside Pillow: the same colours as indexing the table with
    the grey levels in numpy, without numpy's copies of a 16 Mpx picture (110 MB) or its 0.2 s."""
    grey = Image.fromarray((to_unit(values) * 255).round().astype(np.uint8), mode="L")
    upsampled = grey.resize(size, Image.Resampling.BILINEAR)
    upsampled.putpalette(_VIRIDIS_PALETTE)  # "L" becomes "P", each level its colour
    return upsampled.convert("RGB")


def overlay(image: Image.Image, values: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """The map as a heatmap blended over `image`, at the image's size, a band of rows at a time:
    Pillow's blend holds the interpreter's lock for all it is given (60 ms for 16 Mpx, the event
    loop's stall), a few milliseconds a band. Pixel for pixel the same as one blend."""
    base, heat = image.convert("RGB"), heatmap(values, image.size)  # base: a copy of its own
    width, height = base.size
    rows = max(1, BAND_PIXELS // width)
    for top in range(0, height, rows):
        box = (0, top, width, min(top + rows, height))
        base.paste(Image.blend(base.crop(box), heat.crop(box), alpha), box[:2])
    return base


def pick(attention: np.ndarray, index: int | None, what: str) -> np.ndarray:
    """attention[index] along axis 0 (default: the last), with a clear 422 when out of range."""
    count = attention.shape[0]
    if index is not None and index >= count:
        raise ServiceError(422, "invalid_request", f"{what} must be below {count}")
    picked: np.ndarray = attention[count - 1 if index is None else index]
    return picked


def heads(attention: np.ndarray, head: int | None, fusion: HeadFusion = "mean") -> np.ndarray:
    """`[heads, ...]` -> one head, or all heads fused."""
    return fuse_heads(attention[None], fusion)[0] if head is None else pick(attention, head, "head")


# The largest picture the service draws (a render, an overlay, a strip of panels): 16 Mpx, 48 MB as
# RGB. Beyond it a `scale` or a long thin image would make a tiny request cost gigabytes.
MAX_PICTURE_PIXELS = 16_000_000


def check_picture(width: int, height: int) -> None:
    if width * height > MAX_PICTURE_PIXELS:
        message = f"the picture would be {width}x{height} pixels; the limit is {MAX_PICTURE_PIXELS}: ask for less"
        raise ServiceError(413, "picture_too_large", message)


def enlarged(image: Image.Image, scale: int) -> Image.Image:
    """Each pixel as a scale x scale block (maps over tiny inputs stay legible)."""
    check_picture(image.width * scale, image.height * scale)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST) if scale > 1 else image
