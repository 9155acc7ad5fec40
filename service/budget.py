"""What decoding may cost. Per image, the header's size (`max_image_pixels`); per request, the sum of
its images' pixels, of the bytes their decoding holds (memory: pixels times the bytes a pixel of the
mode it expands to takes, see service.imaging.held_bytes) and of their decoding passes (CPU: a
progressive JPEG is decoded once per scan); per process, the bytes being decoded and held at once,
so that concurrent requests within their own limits cannot add up to more memory than the host has:
a request waits for room instead. The memory limits are set in pixels of BYTES_PER_PIXEL bytes."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from service.errors import ServiceError

if TYPE_CHECKING:
    from service.settings import Settings

WAIT_STEP_S = 0.25  # how often a waiting request looks whether its client has gone
BYTES_PER_PIXEL = 4  # of the pixel limits' pixels: an RGB pixel as Pillow holds it


class Sized(Protocol):
    @property
    def pixels(self) -> int: ...
    @property
    def passes(self) -> int: ...
    def held(self, model_mode: str | None = None) -> int: ...


class Abandoned(ServiceError):
    def __init__(self) -> None:
        super().__init__(499, "client_left", "the request was abandoned before its images were decoded")


class MemoryBudget:
    """Bytes being decoded and held at once, process-wide. Taken in the worker thread that decodes
    (so the common case costs no extra hop), given back by the request when it ends."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._room = threading.Condition()

    def take(self, amount: int, claim: Claim) -> None:
        """Blocks until `amount` fits, unless the claim is abandoned first (then raises `Abandoned`)."""
        with self._room:
            while not claim.abandoned and self.used + amount > self.limit:
                self._room.wait(WAIT_STEP_S)
            if claim.abandoned:
                raise Abandoned
            self.used += amount
            claim.held += amount

    def give_back(self, claim: Claim) -> None:
        """Ends the claim: its pixels are free again, and a thread still decoding for it stops at the next image."""
        with self._room:
            claim.abandoned = True
            self.used -= claim.held
            claim.held = 0
            self._room.notify_all()


@dataclass
class Claim:
    """One request's share of the budget; `abandoned` once the request has ended (answered or gone)."""

    held: int = 0
    abandoned: bool = False


T = TypeVar("T")


class ImageThreads:
    """Worker threads for image work (decoding, drawing, encoding PNGs): two per core. Some decoders
    hold the interpreter's lock while they work (Pillow's BMP RLE and TIFF strips); six of them at
    once, in as many threads, held the event loop for 0.9 s. One per core cost the photo path 4% at
    concurrency 8; two per core nothing measurable. Made on first use, in the running loop."""

    def __init__(self, count: int = 0) -> None:
        self.count = count or 2 * len(os.sched_getaffinity(0))
        self._limiter: anyio.CapacityLimiter | None = None

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.count)
        return await anyio.to_thread.run_sync(partial(work, *args), limiter=self._limiter)


@dataclass(frozen=True)
class ImageLimits:
    max_image_pixels: int
    max_request_pixels: int
    max_request_work: int  # pixels x passes
    budget: MemoryBudget = field(compare=False)
    threads: ImageThreads = field(default_factory=ImageThreads, compare=False)
    max_images: int = 256  # images in one request, uploaded or generated (the max_images_per_request setting)

    @classmethod
    def of(cls, settings: Settings) -> ImageLimits:
        """The settings' limits, with a budget of their own: one per process (the app's, or an offline run's)."""
        budget = MemoryBudget(BYTES_PER_PIXEL * settings.max_decoding_pixels)
        return cls(settings.max_image_pixels, settings.max_request_pixels, settings.max_request_decode_work, budget,
                   max_images=settings.max_images_per_request)  # fmt: skip

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """`work(*args)` in one of the image threads: off the event loop, and never too many at once."""
        return await self.threads.run(work, *args)

    @property
    def max_request_bytes(self) -> int:
        return BYTES_PER_PIXEL * self.max_request_pixels

    def check_request(self, images: Sequence[Sized], model_mode: str | None = None) -> int:
        """The bytes the request's decoding holds, for a model taking `model_mode`, if its images
        together are within the request limits (else 413)."""
        pixels = sum(image.pixels for image in images)
        if pixels > self.max_request_pixels:
            message = f"the images hold {pixels} pixels together; the limit per request is {self.max_request_pixels}"
            raise ServiceError(413, "request_too_large", message)
        held = sum(image.held(model_mode) for image in images)
        if held > self.max_request_bytes:
            message = (f"decoding these images holds {held / 2**20:.0f} MiB (a pixel takes 1 to 16 bytes by what "
                       "it becomes: greyscale 1, RGB 4, a palette 5, with an alpha channel 8, WebP up to 16); the "
                       f"limit per request is {self.max_request_bytes / 2**20:.0f} MiB")  # fmt: skip
            raise ServiceError(413, "request_too_large", message)
        work = sum(image.pixels * image.passes for image in images)
        if work > self.max_request_work:
            message = (f"decoding these images takes {work} pixel passes (a progressive JPEG counts each scan); "
                       f"the limit per request is {self.max_request_work}")  # fmt: skip
            raise ServiceError(413, "decode_budget", message)
        return held

    @contextmanager
    def claim(self) -> Iterator[Claim]:
        """A request's claim on the process-wide budget, given back when the block ends."""
        claim = Claim()
        try:
            yield claim
        finally:
            self.budget.give_back(claim)
