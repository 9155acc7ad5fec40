from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from service.errors import ServiceError
from service.imaging import decode_all, decode_image, normalize, open_all, preprocess, preprocess_batch, to_unit_array
from service.manifest import Preprocessing
from tests.helpers import encode, limits, png_bytes, png_header_only

LIMIT = 10_000_000


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data, LIMIT))


def error_of(data: bytes, max_pixels: int = LIMIT) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        decode_image(data, max_pixels)
    return info.value


def test_greyscale_stays_single_channel() -> None:
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    out = decode_image(png_bytes(image), LIMIT)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_palette_becomes_its_colours() -> None:
    rgb = Image.new("RGB", (4, 4), (200, 30, 60))
    out = decoded(png_bytes(rgb.convert("P", palette=Image.Palette.ADAPTIVE)))
    assert out.shape == (4, 4, 3)
    np.testing.assert_array_equal(out[0, 0], [200, 30, 60])


def test_transparency_composites_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = decoded(png_bytes(rgba))
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 1], [10, 20, 30])


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("RGB", (16, 16), (220, 40, 40)).convert("CMYK")
    out = decoded(encode(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 16, 3)
    np.testing.assert_allclose(out[8, 8], [220, 40, 40], atol=12)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    wide = np.array([[0, 32896, 65535]], dtype=np.uint16)
    out = decoded(png_bytes(Image.fromarray(wide)))
    np.testing.assert_array_equal(out, [[0, 128, 255]])


def test_exif_orientation_is_applied() -> None:
    image = Image.new("L", (40, 20), 0)
    image.paste(255, (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    out = decoded(encode(image, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 20)  # height 40, width 20 once upright
    assert out[:20].mean() > 200 and out[20:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 422, "empty_image"),
        (b"this is not an image", 415, "unsupported_image"),
        (png_bytes(Image.new("L", (64, 64), 7))[:-40], 422, "corrupt_image"),
    ],
    ids=["empty", "text", "truncated-png"],
)
def test_bad_bytes_are_clear_errors(data: bytes, status: int, code: str) -> None:
    exc = error_of(data)
    assert (exc.status, exc.code) == (status, code)


def test_truncated_jpeg_is_corrupt() -> None:
    jpeg = encode(Image.effect_noise((64, 64), 50), "JPEG")
    assert error_of(jpeg[: len(jpeg) // 2]).status == 422


def test_pixel_bomb_refused_from_header() -> None:
    exc = error_of(png_header_only(20_000, 20_000))
    assert (exc.status, exc.code) == (413, "image_too_large")


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decoded(data).max() < 50


SPEC = Preprocessing(color_mode="L", size=(32, 32), mean=[0.25], std=[0.5])


def test_preprocess_resizes_and_normalises() -> None:
    image = Image.new("RGB", (8, 8), (255, 255, 255))
    unit = to_unit_array(image, SPEC)
    assert unit.shape == (1, 32, 32) and unit.dtype == np.float32
    np.testing.assert_allclose(unit, 1.0)
    np.testing.assert_allclose(preprocess(image, SPEC), (1.0 - 0.25) / 0.5)
    np.testing.assert_allclose(normalize(unit[None], SPEC), (1.0 - 0.25) / 0.5)


def test_rgb_preprocess_is_channels_first() -> None:
    spec = Preprocessing(color_mode="RGB", size=(4, 6), mean=[0, 0, 0], std=[1, 1, 1])
    unit = to_unit_array(Image.new("RGB", (3, 2), (255, 0, 51)), spec)
    assert unit.shape == (3, 4, 6)
    np.testing.assert_allclose(unit[:, 0, 0], [1.0, 0.0, 0.2], atol=1e-6)


def test_batch_error_names_the_image() -> None:
    good = png_bytes(Image.new("L", (8, 8)))
    with pytest.raises(ServiceError) as info:
        open_all([good, b"junk"], limits(LIMIT))
    assert info.value.message.startswith("image 1:")
    with pytest.raises(ServiceError) as info:
        truncated = png_bytes(Image.effect_noise((64, 64), 40))[:-50]  # its header reads; its pixels don't
        decode_all(open_all([good, truncated], limits(LIMIT)), SPEC)
    assert info.value.message.startswith("image 1:") and info.value.code == "corrupt_image"
    decoded = decode_all(open_all([good, good], limits(LIMIT)), SPEC)
    batch = preprocess_batch(decoded, SPEC)
    assert len(decoded) == 2 and batch.shape == (2, 1, 32, 32)
    np.testing.assert_array_equal(batch[1], preprocess(decoded[1].image, SPEC))


def test_letterbox_keeps_aspect_and_pads_bottom_right() -> None:
    spec = Preprocessing(color_mode="L", size=(32, 32), resize="letterbox", fill=0, mean=[0], std=[1])
    image = Image.new("L", (64, 32), 255)  # wide: scaled by 0.5 to 32x16
    unit = to_unit_array(image, spec)[0]
    assert unit.shape == (32, 32)
    np.testing.assert_allclose(unit[:16], 1.0)
    np.testing.assert_allclose(unit[16:], 0.0)


def test_jpegs_with_more_scans_than_encoders_use_are_refused() -> None:
    """A progressive JPEG costs one decoding pass per scan: a few KB can hold thousands (a CPU bomb)."""
    from service.imaging import MAX_JPEG_SCANS

    photo = Image.effect_noise((64, 48), 60).convert("RGB")
    progressive = encode(photo, "JPEG", quality=90, progressive=True)
    assert 1 < progressive.count(b"\xff\xda") <= MAX_JPEG_SCANS
    assert decode_image(progressive, LIMIT).size == (64, 48)  # real progressive photos still decode
    last_scan = progressive.rindex(b"\xff\xda")
    bomb = progressive[:last_scan] + progressive[last_scan:-2] * MAX_JPEG_SCANS + b"\xff\xd9"
    with pytest.raises(ServiceError) as info:
        decode_image(bomb, LIMIT)
    assert (info.value.status, info.value.code) == (422, "too_many_scans")


@pytest.mark.parametrize("fmt", ["PPM", "SGI", "IM", "DDS", "TGA", "PCX", "ICO"])
def test_formats_outside_the_allow_list_are_415(fmt: str) -> None:
    """Pillow reads dozens of formats; the service decodes only those photos and pictures come in."""
    image = Image.new("RGBA" if fmt == "DDS" else "RGB", (16, 16), (10, 200, 30, 255)[: 4 if fmt == "DDS" else 3])
    with pytest.raises(ServiceError) as info:
        decode_image(encode(image, fmt), LIMIT)
    assert (info.value.status, info.value.code) == (415, "unsupported_image")


def test_broken_headers_of_allowed_formats_are_422_not_500() -> None:
    """Pillow raises ValueError, KeyError, SyntaxError... for some broken headers: each is the client's 422."""
    tiff = bytearray(encode(Image.new("RGB", (16, 16)), "TIFF"))
    png = bytearray(png_bytes(Image.new("L", (16, 16))))
    png[16:24] = b"\xff" * 8  # IHDR width and height far beyond reason
    for broken in (bytes(tiff[:40]) + b"\xff" * 200, bytes(png), b"GIF89a" + b"\x00" * 3):
        with pytest.raises(ServiceError) as info:
            decode_image(broken, LIMIT)
        assert 400 <= info.value.status < 500, info.value.status
