"""The hostile-client audit of issue 13, class by class, through the real app: each input with the
status it must get. Neighbouring files cover the rest: batch isolation, decode budgets, bombs under
memory and liveness checks, the /v2 codec, slow and idle connections; tests/api/test_service_api.py
the logs, auth and readiness classes."""

from __future__ import annotations

import base64
import io
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.helpers import encode, png_bytes, png_header_only

PNG = {"content-type": "image/png"}


def progressive_bomb(scans: int) -> bytes:
    """A tiny progressive JPEG whose last scan repeats: each repeat is one more decoding pass."""
    jpeg = encode(Image.effect_noise((16, 16), 60).convert("RGB"), "JPEG", progressive=True)
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:last] + jpeg[last:-2] * (scans - jpeg.count(b"\xff\xda") + 1) + b"\xff\xd9"


def broken(fmt: str) -> bytes:
    """A file of an allowed format whose header is wrong where Pillow raised odd exceptions: now
    Pillow cannot identify it at all."""
    if fmt == "TIFF":
        return encode(Image.new("RGB", (16, 16)), "TIFF")[:40] + b"\xff" * 200
    png = bytearray(png_bytes(Image.new("L", (16, 16))))
    png[16:24] = b"\xff" * 8  # IHDR: width and height far beyond reason
    return bytes(png)


def netpbm_like(fmt: str) -> bytes:
    """Formats Pillow reads but the service does not, malformed as the audit sent them."""
    return {
        "PPM": b"P6\n99999999 99999999\n255\n" + b"\x00" * 64,
        "XBM": b"#define im_width 99999999\n#define im_height 1\nstatic char im_bits[] = {0x00};\n",
        "SGI": b"\x01\xda\x01\x01\x00\x03" + b"\xff" * 100,
        "IM": b"Image type: RGB image\r\nName: x\r\nImage size (x*y): 99999999*99999999\r\n\x1a" + b"\x00" * 64,
        "DDS": b"DDS |" + b"\xff" * 124,
    }[fmt]


CASES = [
    # CPU bombs: thousands of scans in a few KB
    ("2,000-scan progressive jpeg", "/v1/classify", {"content": progressive_bomb(2000)}, 422, "too_many_scans"),
    # memory within the documented limits
    ("64 images of 39.7 Mpx in one body", "/v1/classify",
     {"files": [("file", (f"{i}.png", png_header_only(6300, 6300), "image/png")) for i in range(64)]},
     413, "request_too_large"),
    ("attention drawn 64 times a 1000x1000 image", "/v1/classify/attention?scale=64&render=true",
     {"content": png_bytes(Image.new("L", (1000, 1000)))}, 413, "picture_too_large"),
    ("detection attention drawn 64 times", "/v1/detect/attention?scale=64&render=true",
     {"content": png_bytes(Image.new("L", (1000, 1000)))}, 413, "picture_too_large"),
    # 500s for client mistakes: formats outside the allow-list, broken headers of allowed ones
    *[(f"malformed {fmt}", "/v1/classify", {"content": netpbm_like(fmt)}, 415, "unsupported_image")
      for fmt in ("PPM", "XBM", "SGI", "IM", "DDS")],
    *[(f"malformed {fmt}", "/v1/classify", {"content": broken(fmt)}, 415, "unsupported_image")
      for fmt in ("TIFF", "PNG")],
    ("json nested 100,000 deep", "/v1/classify",
     {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
     400, "invalid_json"),
    # loose options: the same validation wherever they come from
    ("negative top_k", "/v1/classify?top_k=-1", {"content": png_bytes(Image.new("L", (8, 8)))}, 422, None),
    ("threshold above 1", "/v1/detect?threshold=2", {"content": png_bytes(Image.new("L", (8, 8)))}, 422, None),
    ("max_detections 0", "/v1/detect?max_detections=0", {"content": png_bytes(Image.new("L", (8, 8)))}, 422, None),
    # found by a hostile review after the fixes
    ("a 5,000-digit number in a JSON body", "/v1/classify",
     {"content": b'{"images": [], "top_k": ' + b"1" * 5000 + b"}", "headers": {"content-type": "application/json"}},
     400, "invalid_json"),
    ("a 1 x 70,000 image", "/v1/classify", {"content": png_bytes(Image.new("L", (1, 70_000)))}, 413, "image_too_large"),
    ("a 400,000-value generate body", "/v1/generate",
     {"content": b'{"x": [' + b"0," * 400_000 + b'0]}', "headers": {"content-type": "application/json"}},
     413, "json_too_large"),
    # errors quote at most a short prefix of what was sent
    ("a 100 KB model name", "/v1/classify",
     {"json": {"images": [base64.b64encode(png_bytes(Image.new("L", (8, 8)))).decode()], "model": "m" * 100_000}},
     404, "unknown_model"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "kwargs", "status", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_hostile_input_gets_its_status(
    client: TestClient,
    path: str,
    kwargs: dict,  # type: ignore[type-arg]
    status: int,
    code: str | None,
) -> None:
    kwargs = {"headers": PNG, **kwargs} if "content" in kwargs else kwargs
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text[:300]
    if code is not None:
        assert response.json()["error"]["code"] == code
    assert len(response.content) < 2_000  # nothing a client sent comes back whole


def test_a_long_thin_image_renders_within_the_picture_cap(client: TestClient) -> None:
    """A 100-byte 20000x1 PNG once built a 5.12M x 256 canvas (+5 GB, 38 s)."""
    response = client.post("/v1/detect?render=true", content=png_bytes(Image.new("L", (20_000, 1))), headers=PNG)
    assert response.status_code in (200, 413), response.text[:300]
    if response.status_code == 200:
        picture = Image.open(io.BytesIO(response.content))
        assert picture.width * picture.height <= 16_000_000
        assert np.asarray(picture).size > 0


def test_16_bit_images_are_priced_by_their_bytes_and_convert_by_blocks() -> None:
    """A 16-bit pixel is 2 bytes before its 8-bit conversion, held beside it: the budgets price it at
    3, and the conversion never holds a full-size float copy (a 36 Mpx PNG took +500 MB and 4.7 s)."""
    from service.imaging import BAND_BYTES, BAND_PIXELS, decode_image, open_image

    wide = np.zeros((BAND_PIXELS // 1000 + 7, 1000), dtype=np.uint16)  # more rows than one band holds
    wide[:, :6] = [0, 128, 129, 30000, 65407, 65535]  # round(x / 257): 0, 0, 1, 117, 255, 255
    data = png_bytes(Image.fromarray(wide))
    assert open_image(data, 10**8).held("L") == 3 * wide.size + BAND_BYTES
    narrow = np.asarray(decode_image(data, 10**8))
    assert narrow.dtype == np.uint8 and (narrow[:, :6] == [0, 0, 1, 117, 255, 255]).all()
    assert (narrow[:, 6:] == 0).all()


def test_uvicorn_warnings_are_collapsed() -> None:
    """uvicorn warns once per malformed request; the log gets one line per 10 s, then a count."""
    import logging

    from service.logs import Collapse

    def record() -> logging.LogRecord:
        return logging.LogRecord("uvicorn.error", logging.WARNING, "", 0, "Invalid HTTP request received.", None, None)

    collapse = Collapse(every=10.0)
    passed = [collapse.filter(record()) for _ in range(200)]
    assert passed == [True] + [False] * 199
    collapse.seen["uvicorn.error: Invalid HTTP request received."] = (-100.0, 199)  # ten seconds later
    later = record()
    assert collapse.filter(later) and "199 more like it" in later.getMessage()
    assert collapse.filter(logging.LogRecord("uvicorn.error", logging.INFO, "", 0, "started", None, None))
    # one kind per template: python-multipart's warning names a different index each time
    multipart = [logging.LogRecord("python_multipart.multipart", logging.WARNING, "", 0, "got %r at index %d",
                                   (b"A", i), None) for i in range(5)]  # fmt: skip
    assert [collapse.filter(r) for r in multipart] == [True, False, False, False, False]


def rle8_bmp(width: int, height: int) -> bytes:
    """A BMP in 8-bit run-length encoding (Pillow reads it, but cannot write it)."""
    row = b"".join(bytes([min(255, width - x), 0]) for x in range(0, width, 255)) + b"\x00\x00"
    data = row * height + b"\x00\x01"
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    return header + info + palette + data


def test_dear_decoders_count_as_more_passes_and_webp_twice() -> None:
    """Pillow's BMP RLE decoder is Python (40 passes: a 300 KB file held 3.6 s of CPU), raw TIFF
    strips cost a Python call each, and WebP holds several RGBA copies while it decodes."""
    from service.imaging import RLE_PASSES, decode_image, open_image

    rle = open_image(rle8_bmp(64, 64), 10**8)
    assert rle.passes == RLE_PASSES and np.asarray(decode_image(rle8_bmp(64, 64), 10**8)).shape == (64, 64)
    strips = io.BytesIO()
    Image.new("L", (600, 4000)).save(strips, "TIFF", tiffinfo={278: 1})  # one row per strip: 4,000 strips
    assert open_image(strips.getvalue(), 10**8).passes == 1 + 4000 * 4096 // (600 * 4000) + 1
    webp = io.BytesIO()
    Image.new("RGB", (100, 100)).save(webp, "WEBP", lossless=True)
    assert open_image(webp.getvalue(), 10**8).held("RGB") == (4 + 8) * 100 * 100  # libwebp's buffer, then Pillow's


def test_a_big_rle_bitmap_is_over_the_decode_budget(client: TestClient) -> None:
    response = client.post("/v1/classify", content=rle8_bmp(6000, 6000), headers={"content-type": "image/bmp"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "decode_budget"
