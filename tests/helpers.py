"""Small builders shared by the tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from export.data import load_digits_data


def png_bytes(image: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **params)
    return buf.getvalue()


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost no data: a decompression-bomb probe."""
    small = png_bytes(Image.new("L", (1, 1)))
    ihdr_data = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr_data
    ihdr = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return small[:8] + ihdr + small[8 + 25 :]


def held_out_digits(seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    data = load_digits_data(seed=seed)
    return data.held_out.images, data.held_out.labels
