"""Small builders shared by the tests."""

from __future__ import annotations

import io
import json
import signal
import struct
import zlib

import numpy as np
from PIL import Image

from export.data import load_digits_data
from service.budget import ImageLimits, MemoryBudget
from service.imaging import Decoded, decode_all, open_all
from service.manifest import Preprocessing


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


def triton_images(images: list[bytes], parameters: dict[str, object] | None = None) -> dict[str, object]:
    """`client.post` keywords for a /v2 infer request whose BYTES input `image` holds `images`, sent with
    Triton's binary tensor extension: the JSON header, then each element as a 4-byte little-endian
    length and its bytes; the header's length in Inference-Header-Content-Length."""
    blob = b"".join(struct.pack("<I", len(image)) + image for image in images)
    tensor = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(images)],
        "parameters": {"binary_data_size": len(blob)},
    }
    header = json.dumps({"inputs": [tensor], "parameters": parameters or {}}).encode()
    return {"content": header + blob, "headers": {"Inference-Header-Content-Length": str(len(header))}}


def limits(max_pixels: int = 10**8) -> ImageLimits:
    """Image limits for direct calls: `max_pixels` per image, room for many such images."""
    return ImageLimits(max_pixels, 10**10, 10**12, MemoryBudget(10**10))


def decode_one(data: bytes, limits: ImageLimits, spec: Preprocessing | None = None) -> Decoded:
    """One image through the service's decode steps (header checks, the pixel budget, reduced-scale
    decoding for `spec`), as the pipeline takes them."""
    opened = open_all([data], limits)
    with limits.claim() as claim:
        limits.budget.take(opened[0].pixels, claim)
        return decode_all(opened, spec, claim)[0]


def ctrl_c_reaches_it() -> None:
    """A child's `preexec_fn`: Ctrl-C (SIGINT) back to its default. A test run started in the
    background by a shell without job control (as a CI script may be) ignores SIGINT, its children
    inherit that, and Python then installs no KeyboardInterrupt handler: a SIGINT a test sends would
    do nothing (`serve run` never stopped; `vitserve predict` was never interrupted)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
