"""Decoding within budgets: per request (pixels for memory, pixel passes for CPU) and per process
(pixels decoded at once), and no more decoding for a request that has ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.budget import Abandoned, Claim, ImageLimits, PixelBudget
from service.imaging import decode_all, open_all
from service.settings import Settings
from tests.conftest import SHIPPED_REPOSITORY, client_for
from tests.helpers import encode, png_bytes, png_header_only, triton_images


def test_the_budget_makes_a_request_wait_for_room_and_frees_it_at_the_end() -> None:
    budget = PixelBudget(100)
    first, second = Claim(), Claim()
    budget.take(80, first)
    got_room = threading.Event()

    def take_second() -> None:
        budget.take(50, second)
        got_room.set()

    waiter = threading.Thread(target=take_second)
    waiter.start()
    assert not got_room.wait(0.3)  # 80 + 50 > 100: it waits
    budget.give_back(first)
    assert got_room.wait(5) and budget.used == 50
    waiter.join()
    budget.give_back(second)
    assert budget.used == 0


def test_a_request_that_ends_while_waiting_stops_waiting() -> None:
    budget = PixelBudget(10)
    holder, late = Claim(), Claim()
    budget.take(10, holder)
    outcome: list[BaseException] = []

    def wait_for_room() -> None:
        try:
            budget.take(5, late)
        except Abandoned as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_room)
    waiter.start()
    time.sleep(0.05)
    budget.give_back(late)  # the request answered 504, or its client left
    waiter.join(5)
    assert outcome and outcome[0].status == 499 and budget.used == 10  # it took nothing


def test_no_image_is_decoded_for_an_abandoned_request() -> None:
    limits = ImageLimits(10**6, 10**7, 10**8, PixelBudget(10**7))
    opened = open_all([png_bytes(Image.new("L", (8, 8)))] * 2, limits)
    claim = Claim(abandoned=True)
    with pytest.raises(Abandoned):
        decode_all(opened, None, claim)


@pytest.fixture(scope="module")
def tight_client() -> Iterator[TestClient]:
    """Budgets small enough to meet with small images."""
    settings = Settings(model_repository=SHIPPED_REPOSITORY, device="cpu", max_image_pixels=1_000_000,
                        max_request_pixels=2_000_000, max_request_decode_work=6_000_000,
                        max_decoding_pixels=2_000_000)  # fmt: skip
    yield from client_for(settings)


def test_images_over_the_request_pixel_budget_are_413_before_decoding(tight_client: TestClient) -> None:
    """Each image within its own limit, together over the request's (64 such in 8 MB held +2.7 GB)."""
    bombs = [png_header_only(1000, 1000)] * 3  # headers only: refusing them must not need their pixels
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(bombs)]
    response = tight_client.post("/v1/classify", files=files)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    v2 = tight_client.post("/v2/models/vit_image/infer", **triton_images(bombs))  # type: ignore[arg-type]
    assert v2.status_code == 400  # the protocol's status for every client error
    assert "limit per request" in v2.json()["error"]


def test_progressive_jpegs_over_the_decode_budget_are_413(tight_client: TestClient) -> None:
    """A progressive JPEG is decoded once per scan: its pixels count once per scan."""
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8))
    progressive = encode(photo, "JPEG", quality=90, progressive=True)
    scans = progressive.count(b"\xff\xda")
    assert 700 * 700 * scans > 6_000_000 / 2  # two of them pass the budget, one does not
    one = tight_client.post("/v1/classify", content=progressive, headers={"content-type": "image/jpeg"})
    assert one.status_code == 200, one.text
    files = [("file", (f"{i}.jpg", progressive, "image/jpeg")) for i in range(2)]
    two = tight_client.post("/v1/classify", files=files)
    assert two.status_code == 413 and two.json()["error"]["code"] == "decode_budget"
    baseline = encode(photo, "JPEG", quality=90)
    files = [("file", (f"{i}.jpg", baseline, "image/jpeg")) for i in range(2)]
    assert tight_client.post("/v1/classify", files=files).status_code == 200  # one pass each


def test_pixel_limits_must_nest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_request_pixels"):
        Settings(model_repository=tmp_path, max_image_pixels=10, max_request_pixels=5)


def test_a_request_over_the_process_budget_cannot_exist() -> None:
    """A request's pixels never exceed the process budget, so waiting for room always ends."""
    with pytest.raises(ValueError):
        Settings(max_request_pixels=10**9, max_decoding_pixels=10**8)
