"""Real photos (scikit-learn's two sample photos, and crops of them at other sizes and aspects), encoded
as JPEG and PNG; each with the image transformers' pipeline is given: the same bytes decoded by PIL."""

from __future__ import annotations

import io
from functools import cache

from PIL import Image


@cache
def photos() -> dict[str, bytes]:
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    pictures = {
        "china": china,
        "flower": flower,
        "portrait": china.crop((100, 0, 380, 427)),
        "wide": flower.crop((0, 100, 640, 300)),
    }
    encoded = {}
    for name, picture in pictures.items():
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            picture.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            encoded[f"{name}.{fmt.lower()}"] = buffer.getvalue()
    return encoded


def decoded(data: bytes) -> Image.Image:
    """What the pipeline sees: the bytes decoded by PIL, as its own load_image would."""
    return Image.open(io.BytesIO(data)).convert("RGB")
