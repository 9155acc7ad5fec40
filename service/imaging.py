"""Image decoding that survives whatever a user uploads, and the manifest's preprocessing."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TypeVar

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from service.budget import Abandoned, Claim, ImageLimits
from service.context import timed
from service.errors import ServiceError
from service.manifest import Preprocessing
from service.text import quoted

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,  # area averaging: exact for enlarged pixel art such as our own PNGs
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# The formats users send photos and pictures in; Pillow's other decoders (PPM, XBM, SGI, IM, DDS, ...)
# are rarely needed and more often a way in.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG's opener also reads MPO (cameras' JPEGs)
Image.init()  # registers every plugin, so that Image.open(formats=FORMATS) knows them all

# Pillow's own bomb check is a warning at 89 Mpx; we enforce our limit before decoding instead.
Image.MAX_IMAGE_PIXELS = None


Box = tuple[float, float, float, float]  # left, top, right, bottom


@dataclass(frozen=True, slots=True)
class Decoded:
    """An upright 8-bit "L" or "RGB" image, and the size of the client's image (upright), which
    boxes and points refer to. The image itself may be smaller: see `decode`."""

    image: Image.Image
    size: tuple[int, int]  # (width, height)
    # where the original lies in `image`, when decoded at reduced scale: libjpeg rounds a side that
    # is not a multiple of the scale up, so the last row or column covers less of the original
    box: Box | None = None


# A JPEG headed for a small model input is decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT (Pillow's
# `draft`), keeping at least this many pixels per model pixel along each axis: Pillow's own default
# for thumbnails, whose result it documents as indistinguishable from a full decode and resize.
REDUCING_GAP = 2.0

# A progressive JPEG is decoded once more for each of its scans: 2,000 scans in 64 KB cost seconds of
# CPU. Encoders use about 10 (libjpeg's and mozjpeg's progressions); libjpeg-turbo's own tools offer
# `-maxscans` for the same attack. Start-of-scan markers cannot hide in the entropy-coded data (0xFF
# is stuffed there as FF 00), so counting them in the bytes is exact.
MAX_JPEG_SCANS = 64

# Resampling works out coefficients along each side before it lets other threads run, and decoders
# pay per row, so a long thin image stalls everything: no side may be longer than JPEG allows.
MAX_SIDE = 65_535

# What decoding costs, for the budgets. Pillow's BMP RLE decoder is written in Python (about 100 ns a
# pixel: 40 passes), and raw TIFF strips and tiles are decoded one Python call each (about 10 us:
# 4,096 pixel passes each).
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
RLE_PASSES = 40
TILE_PASSES = 4096

# What decoding holds, in bytes a pixel, priced from the header before any pixel is decoded: what a
# file becomes, not what it weighs (a 52 KB PNG can hold 40 Mpx). Pillow keeps "1", "L" and "P" in
# one byte a pixel, 16-bit greyscale in two, every other mode in four (RGB, RGBA, LA, CMYK, 32-bit,
# float). The decoded image is held beside its 8-bit conversion (L for greyscale, RGB for the rest:
# see _to_8bit; transparency is composited a band at a time, so a palette with transparency never
# becomes a whole RGBA copy), and that beside the model's colour mode where it differs. libwebp
# decodes into a buffer of its own, which Pillow copies: WebP holds WEBP_EXTRA more (measured).
ONE_BYTE_MODES = ("1", "L", "P")
WEBP_EXTRA = 8
BAND_PIXELS = 2**20  # pixels converted at a time where a conversion goes by bands
BAND_BYTES = 16 * BAND_PIXELS  # what a band's copies hold: RGBA, the white ground, the composite, RGB


def stored_bytes(mode: str) -> int:
    """Bytes a pixel of `mode` takes in Pillow's memory."""
    return 1 if mode in ONE_BYTE_MODES else 2 if mode.startswith("I;16") else 4


def eight_bit_mode(mode: str) -> str:
    """The mode _to_8bit makes of an image in `mode`."""
    return "L" if mode in ("L", "1", *WIDE_MODES) else "RGB"


def held_bytes(mode: str, file_format: str | None, model_mode: str | None = None) -> int:
    """Bytes a pixel holds at the peak of its decoding (see ONE_BYTE_MODES), for a model taking
    `model_mode` (None: the image is kept at full size as decoded, to be drawn on)."""
    converted = eight_bit_mode(mode)
    decoding = stored_bytes(mode) + (0 if converted == mode else stored_bytes(converted))
    if file_format == "WEBP":
        decoding += WEBP_EXTRA
    fitting = stored_bytes(converted) + (stored_bytes(model_mode) if model_mode not in (None, converted) else 0)
    return max(decoding, fitting)


@dataclass(frozen=True, slots=True)
class Opened:
    """An image whose header has been read and checked; no pixel decoded yet."""

    image: Image.Image
    data: bytes
    passes: int = 1  # what decoding costs, in passes over its pixels: a progressive JPEG's scans, say

    @property
    def pixels(self) -> int:
        """The image's pixels, by its header."""
        return self.image.width * self.image.height

    def held(self, model_mode: str | None = None) -> int:
        """Bytes its decoding holds at the peak, for a model taking `model_mode` (see held_bytes)."""
        banded = self.image.mode in WIDE_MODES or _transparent(self.image)
        return self.pixels * held_bytes(self.image.mode, self.image.format, model_mode) + banded * BAND_BYTES


def open_image(data: bytes, max_pixels: int) -> Opened:
    """Reads and checks the header: 422 empty, 415 not an image, 413 too many pixels, 422 too many scans."""
    if not data:
        raise ServiceError(422, "empty_image", "the image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError as exc:
        message = f"the data is not an image in a format we read ({', '.join(FORMATS)})"
        raise ServiceError(415, "unsupported_image", message) from exc
    except Exception as exc:  # a known format with a broken header: Pillow raises OSError, ValueError, KeyError...
        raise ServiceError(422, "corrupt_image", f"the image header could not be read: {quoted(exc, 200)}") from exc
    width, height = image.size
    if max(width, height) > MAX_SIDE:
        message = f"the image is {width}x{height}; no side may be over {MAX_SIDE} pixels"
        raise ServiceError(413, "image_too_large", message)
    if width * height > max_pixels:
        raise ServiceError(
            413,
            "image_too_large",
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}",
        )
    if image.format not in ("JPEG", "MPO"):
        return Opened(image, data, _passes(image))
    if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
        raise ServiceError(422, "too_many_scans", f"the JPEG has {scans} scans; the limit is {MAX_JPEG_SCANS}")
    return Opened(image, data, max(scans, 1))


def _passes(image: ImageFile.ImageFile) -> int:
    """What decoding costs in passes over the pixels, for decoders dearer than one (see RLE_PASSES)."""
    if image.tile and image.tile[0][0] == "bmp_rle":
        return RLE_PASSES
    if image.format == "TIFF" and len(image.tile) > 1:
        return 1 + math.ceil(len(image.tile) * TILE_PASSES / max(1, image.width * image.height))
    return 1


def decode_opened(opened: Opened, spec: Preprocessing | None = None) -> Decoded:
    """The pixels of an opened image (see `decode`)."""
    image, data = opened.image, opened.data
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if spec is not None and spec.reduced_decode and image.format in ("JPEG", "MPO"):
                return _decode_reduced(data, image, spec)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
    except MemoryError as exc:
        raise ServiceError(413, "image_too_large", "the image needs more memory to decode than the server has") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken files
        raise ServiceError(422, "corrupt_image", f"the image could not be decoded: {quoted(exc, 200)}") from exc
    return Decoded(_to_8bit_alone(image), image.size)


def _to_8bit_alone(image: Image.Image) -> Image.Image:
    """`_to_8bit(image)`, the decoded original closed once converted: the request's Opened would
    otherwise keep it until its images are preprocessed, beside the conversion (see held_bytes)."""
    converted = _to_8bit(image)
    if converted is not image:
        image.close()
    return converted


def _decode_reduced(data: bytes, image: Image.Image, spec: Preprocessing) -> Decoded:
    """Asks libjpeg for the smallest DCT scale that still leaves REDUCING_GAP pixels per model pixel."""
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    turned = orientation in (5, 6, 7, 8)  # rotated by 90 degrees
    upright = (height, width) if turned else (width, height)
    target = letterbox_size(*upright, spec) if spec.resize == "letterbox" else spec.size[::-1]
    needed_w, needed_h = (math.ceil(side * REDUCING_GAP) for side in target)
    drafted = image.draft(spec.color_mode, (needed_h, needed_w) if turned else (needed_w, needed_h))
    reduced = image.size
    image = _decode_into_array(data, image) or image
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    box = _upright_box(drafted[1], reduced, orientation) if drafted else None
    return Decoded(_to_8bit_alone(image), upright, box)


def _decode_into_array(data: bytes, drafted: Image.Image) -> Image.Image | None:
    """The pixels Pillow's draft decode would give (the same libjpeg-turbo, scale and accurate DCT:
    identical, which tests/unit/test_reduced_decode.py checks), through simplejpeg, which decodes
    straight into an array and takes the interpreter's lock back once, not once per 64 KB block: about
    10% less time alone, far less under a busy event loop (see docs/benchmarks.md). None where simplejpeg cannot
    (CMYK, a file libjpeg warns about): Pillow then decodes it, or says what is wrong."""
    if drafted.mode not in ("L", "RGB"):
        return None
    colorspace = "GRAY" if drafted.mode == "L" else "RGB"
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace=colorspace, fastdct=False, fastupsample=False,
                                        min_width=drafted.width, min_height=drafted.height)  # fmt: skip
    except ValueError:
        return None
    if pixels.shape[:2] != (drafted.height, drafted.width):
        return None
    image = Image.fromarray(pixels[..., 0] if colorspace == "GRAY" else pixels, drafted.mode)
    image.info.update(drafted.info)  # its EXIF: the orientation to turn it upright by
    return image


def _upright_box(box: tuple[float, ...], size: tuple[int, int], orientation: int) -> Box:
    """The draft's box (the original's part of the reduced image, at its top left) once the image is
    turned upright as its EXIF orientation says (as ImageOps.exif_transpose turns it)."""
    w, h = size
    x, y = box[2], box[3]
    corners: dict[int, Box] = {
        2: (w - x, 0, w, y), 3: (w - x, h - y, w, h), 4: (0, h - y, x, h), 5: (0, 0, y, x),
        6: (h - y, 0, h, x), 7: (h - y, w - x, h, w), 8: (0, w - x, y, w),
    }  # fmt: skip
    return corners.get(orientation, (0, 0, x, y))


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """One image at full size, outside any request (export reads training images with it)."""
    return decode_opened(open_image(data, max_pixels)).image


def _to_8bit(image: Image.Image) -> Image.Image:
    """Normalise every mode Pillow can hand back to "L" or "RGB"."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in WIDE_MODES:
        return _wide_to_8bit(image)
    if image.mode == "1":
        return image.convert("L")
    if _transparent(image):
        return _on_white(image)
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def _transparent(image: Image.Image) -> bool:
    """Whether _to_8bit composites the image onto white: an alpha channel, or a palette's transparency."""
    return "A" in image.mode or image.mode == "P" and "transparency" in image.info


def _on_white(image: Image.Image) -> Image.Image:
    """Transparency composited onto white, as a browser shows it, into RGB, a band of rows at a time:
    the RGBA copy, the white ground and the composite exist for one band only (whole, they took 12
    bytes a pixel more), and Pillow's alpha_composite, which holds the interpreter's lock for all it
    is given (0.25 s for 40 Mpx), holds it a few milliseconds at a time. Pixel for pixel the same as
    compositing the whole image: each output pixel depends on its own input pixel alone."""
    width, height = image.size
    composited = Image.new("RGB", image.size)
    rows = max(1, BAND_PIXELS // width)
    white = Image.new("RGBA", (width, min(rows, height)), (255, 255, 255, 255))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height))).convert("RGBA")  # crop keeps the palette
        ground = white if band.size == white.size else white.crop((0, 0, *band.size))
        composited.paste(Image.alpha_composite(ground, band).convert("RGB"), (0, top))
    return composited


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (or wider) greyscale to 8 bits: the 0..65535 range scaled down (round(x / 257)), not
    clipped; a band of rows at a time (numpy reads a Pillow image through a copy of its bytes), so
    neither a full-size copy nor a float one is ever held."""
    width, height = image.size
    narrow = Image.new("L", image.size)
    rows = max(1, BAND_PIXELS // width)
    for top in range(0, height, rows):
        block = np.asarray(image.crop((0, top, width, min(top + rows, height)))).astype(np.float32)
        block /= 257.0
        np.clip(block, 0, 255, out=block)
        narrow.paste(Image.fromarray(np.rint(block, out=block).astype(np.uint8), mode="L"), (0, top))
    return narrow


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def letterbox_size(width: int, height: int, spec: Preprocessing) -> tuple[int, int]:
    """The (width, height) an image of this size takes inside the letterboxed input."""
    scale = min(spec.size[1] / width, spec.size[0] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# Hugging Face image processors' size arithmetic, replicated to the pixel (transformers 5.x,
# image_transforms.get_size_with_aspect_ratio, get_resize_output_image_size and center_crop) ------------


def resized_size(width: int, height: int, spec: Preprocessing) -> tuple[int, int]:
    """The (width, height) an image of this size is resized to, before any crop or padding; no side
    under 1 (transformers' arithmetic gives 0 for a short side under 1/192 of a 96-pixel edge, and
    then fails)."""
    new_width, new_height = _resized_size(width, height, spec)
    if spec.size_multiple is not None:  # YOLOS: get_size_with_aspect_ratio_yolos's mod_size
        step = spec.size_multiple
        return max(step, new_width - new_width % step), max(step, new_height - new_height % step)
    return max(1, new_width), max(1, new_height)


def _resized_size(width: int, height: int, spec: Preprocessing) -> tuple[int, int]:
    if spec.resize == "letterbox":
        return letterbox_size(width, height, spec)
    if spec.resize == "stretch":
        return (spec.stretch_to or spec.size)[::-1]
    assert spec.shortest_edge is not None  # the manifest checks it
    if spec.longest_edge is None:  # get_resize_output_image_size(default_to_square=False)
        short, long = sorted((width, height))
        new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    size, raw = spec.shortest_edge, None  # get_size_with_aspect_ratio
    if max(height, width) / min(height, width) * size > spec.longest_edge:
        raw = spec.longest_edge * min(height, width) / max(height, width)
        size = int(round(raw))
    # already that size: kept (get_size_with_aspect_ratio_yolos asks only once width < height is ruled out)
    yolos_portrait = spec.size_multiple is not None and width < height
    if not yolos_portrait and ((height <= width and height == size) or (width <= height and width == size)):
        return width, height
    if width < height:
        return size, int((raw if raw is not None else size) * height / width)
    return int((raw if raw is not None else size) * width / height), size


def centre_crop(image: Image.Image, crop: tuple[int, int]) -> Image.Image:
    """The centre (height, width) of the image; an image smaller than that is padded with zeros around it."""
    (crop_h, crop_w), (width, height) = crop, image.size
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return image.crop((left, top, left + crop_w, top + crop_h))
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    canvas = Image.new(image.mode, (new_w, new_h), 0)
    canvas.paste(image, (pad_left, pad_top))
    top, left = top + pad_top, left + pad_left
    return canvas.crop((max(0, left), max(0, top), min(new_w, left + crop_w), min(new_h, top + crop_h)))


def input_size(image: Decoded, spec: Preprocessing) -> tuple[int, int]:
    """(height, width) of this image's model input: `size`, or its own resized size (shortest_edge, no crop)."""
    return spec.size if spec.fixed_size else resized_size(*image.size, spec)[::-1]


def fit(
    image: Image.Image, spec: Preprocessing, size: tuple[int, int] | None = None, box: Box | None = None
) -> Image.Image:
    """The image in the model's colour mode and input size, by the manifest's resize policy. An image
    decoded at reduced scale passes its original `size` and `box` (see Decoded)."""
    if image.mode != spec.color_mode:
        image = image.convert(spec.color_mode)
    height, width = spec.size
    if spec.resize == "shortest_edge" or spec.crop is not None:  # Hugging Face's recipes
        resized = image.resize(resized_size(*(size or image.size), spec), RESAMPLE[spec.resample], box=box)
        return centre_crop(resized, spec.crop) if spec.crop is not None else resized
    if spec.resize == "stretch":
        return image.resize((width, height), RESAMPLE[spec.resample], box=box)
    inner = image.resize(letterbox_size(*(size or image.size), spec), RESAMPLE[spec.resample], box=box)
    canvas = Image.new(spec.color_mode, (width, height), (spec.fill,) * spec.channels)
    canvas.paste(inner, (0, 0))
    return canvas


def to_unit_array(
    image: Image.Image, spec: Preprocessing, size: tuple[int, int] | None = None, box: Box | None = None
) -> np.ndarray:
    """Resize and convert to `[channels, height, width]` float32 in [0, 1] (before normalisation)."""
    array = np.asarray(fit(image, spec, size, box), dtype=np.float32) * np.float32(spec.rescale_factor)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def normalize(unit: np.ndarray, spec: Preprocessing) -> np.ndarray:
    """(x - mean) / std per channel; works on `[C, H, W]` and `[N, C, H, W]`."""
    mean, std = _channel_stats(tuple(spec.mean), tuple(spec.std))
    normalized: np.ndarray = ((unit - mean) / std).astype(np.float32, copy=False)
    return normalized


@cache
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std, shaped to broadcast over `[..., C, H, W]` (made once per recipe)."""
    return np.asarray(mean, dtype=np.float32)[:, None, None], np.asarray(std, dtype=np.float32)[:, None, None]


def preprocess(image: Image.Image, spec: Preprocessing) -> np.ndarray:
    """A decoded image -> the model's input `[channels, height, width]` float32."""
    return normalize(to_unit_array(image, spec), spec)


def open_all(images: list[bytes], limits: ImageLimits, model_mode: str | None = None) -> list[Opened]:
    """Every image of a request, its header read and checked (see `open_image`), and all of them
    together within the request's limits, for a model taking `model_mode` (see held_bytes)."""
    with timed("decode"):
        opened = _per_image(images, lambda data: open_image(data, limits.max_image_pixels))
        limits.check_request(opened, model_mode)
        return opened


def decode_all(images: list[Opened], spec: Preprocessing | None, claim: Claim | None = None) -> list[Decoded]:
    """Every opened image of a request, decoded (see `decode`); no more once the claim is abandoned
    (the request answered 504, or its client left)."""

    def decode_one(opened: Opened) -> Decoded:
        if claim is not None and claim.abandoned:
            raise Abandoned
        return decode_opened(opened, spec)

    with timed("decode"):
        return _per_image(images, decode_one)


T = TypeVar("T")
R = TypeVar("R")


def _per_image(items: list[T], work: Callable[[T], R]) -> list[R]:
    """`work` on every image in turn; an error names the bad image when there are several."""
    results = []
    for index, item in enumerate(items):
        try:
            results.append(work(item))
        except ServiceError as exc:
            if len(items) > 1:
                exc.message = f"image {index}: {exc.message}"
            raise
    return results


def preprocess_batch(images: list[Decoded], spec: Preprocessing) -> np.ndarray:
    """Decoded images -> one input batch `[N, channels, height, width]`: each resized straight into its
    slot, then the whole batch scaled and normalised in place (`preprocess`'s arithmetic, bit for bit,
    without temporaries per image and step)."""
    batch = np.empty((len(images), spec.channels, *input_size(images[0], spec)), dtype=np.float32)
    for slot, d in zip(batch, images, strict=True):
        pixels = np.asarray(fit(d.image, spec, d.size, d.box))
        slot[...] = pixels if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    mean, std = _channel_stats(tuple(spec.mean), tuple(spec.std))
    batch *= np.float32(spec.rescale_factor)
    batch -= mean
    batch /= std
    return batch
