"""The bomb suite against a real uvicorn: images within every per-image limit, sent together, must
neither stall the event loop (`/health/live` keeps answering) nor take memory beyond the bound the
limits give (docs/production.md, "Memory"): peak resident memory <= resident memory at rest + the
decoding budget (4 bytes x `max_decoding_pixels`: what the images become, priced from their headers)
+ the bodies and the interpreter's own, a quarter more at most."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2
import numpy as np
import pytest
from PIL import Image

from service.budget import BYTES_PER_PIXEL
from tests.e2e.conftest import Server, running_server
from tests.helpers import png_header_only

DECODING_PIXELS = 48_000_000  # 192 MB: one palette bomb (180 MB decoded beside its RGB copy) at a time
SIDE = 6000  # 36 Mpx: under the 40 Mpx per image, two of them over the process's budget


def memory_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.fixture(scope="module")
def bomb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"VITSERVE_MAX_DECODING_PIXELS": str(DECODING_PIXELS), "VITSERVE_MAX_REQUEST_PIXELS": str(DECODING_PIXELS)}
    with running_server(tmp_path_factory.mktemp("bombs"), **env) as server:
        yield server


def palette_png(side: int) -> bytes:
    """36 Mpx in a few KB: a flat palette image, which Pillow decodes to 36 MB and converts to 144 MB."""
    out = io.BytesIO()
    Image.new("P", (side, side), 3).save(out, format="PNG")
    return out.getvalue()


class LivenessProbe:
    """Asks /health/live every 20 ms from its own thread; keeps the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.slowest, self.answers = url, 0.0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._probe)

    def _probe(self) -> None:
        with httpx2.Client(timeout=10) as client:
            while not self.stop.is_set():
                started = time.perf_counter()
                assert client.get(f"{self.url}/health/live").status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - started)
                self.answers += 1
                time.sleep(0.02)

    def __enter__(self) -> LivenessProbe:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()


def test_bombs_within_the_limits_keep_memory_bounded_and_the_loop_free(bomb_server: Server) -> None:
    bomb, pid = palette_png(SIDE), bomb_server.process.pid
    assert len(bomb) < 200_000
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from now (not warm-up's peak)
    at_rest = memory_kb(pid, "VmRSS")
    requests = [
        ("/v1/classify", {"content": bomb, "headers": {"content-type": "image/png"}}),
        ("/v1/detect", {"content": bomb, "headers": {"content-type": "image/png"}}),
        ("/v1/classify", {"content": png_header_only(SIDE, SIDE), "headers": {"content-type": "image/png"}}),
    ] * 4

    def send(request: tuple[str, dict[str, object]]) -> int:
        path, kwargs = request
        return httpx2.post(f"{bomb_server.url}{path}", timeout=120, **kwargs).status_code  # type: ignore[arg-type]

    with LivenessProbe(bomb_server.url) as probe, ThreadPoolExecutor(len(requests)) as pool:
        statuses = list(pool.map(send, requests))
    assert statuses == [200, 200, 422] * 4  # decoded (one at a time); the header-only one is truncated
    peak_mb = (memory_kb(pid, "VmHWM") - at_rest) / 1024
    bound_mb = BYTES_PER_PIXEL * DECODING_PIXELS * 1.25 / 2**20
    print(f"peak over rest {peak_mb:.0f} MB (bound {bound_mb:.0f} MB); slowest /health/live {probe.slowest:.3f} s")
    assert peak_mb < bound_mb
    assert probe.answers > 10 and probe.slowest < 1.0  # generous: the audit saw a 6 s freeze


def sixteen_bit_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((side, side), 40_000, dtype=np.uint16)).save(out, format="PNG")
    return out.getvalue()


def transparent_palette_png(side: int) -> bytes:
    """The issue's 52 KB PNG: it took +603 MiB and held /health/live 375 ms (Pillow's alpha_composite
    holds the interpreter's lock for all it is given); now composited a band at a time."""
    image = Image.new("P", (side, side), 3)
    image.putpalette([i % 256 for i in range(768)])
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=3)
    return out.getvalue()


def rgba_png(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 20, 30, 128)).save(out, format="PNG")
    return out.getvalue()


JSON = "application/json"
HEAVY = [  # (path, body, content type, status): one request each, within every limit
    ("/v1/classify", lambda: json.dumps({"images": ["aGVsbG8="] * 1_000_000}), JSON, 413),
    ("/v2/models/vit/infer", lambda: json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32",
                                                             "shape": [2000, 1, 32, 32], "data": [0.5] * 2_048_000}]}),
     JSON, 400),
    ("/v2/models/vit/infer", lambda: json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32",
                                                             "shape": [256, 1, 32, 32], "data": [0.5] * 262_144}]}),
     JSON, 200),
    ("/v1/generate", lambda: json.dumps({"x": [0] * 3_000_000}), JSON, 413),
    ("/v1/generate", lambda: json.dumps({"num_images": 64, "scale": 64, "seed": 1}), JSON, 200),
    ("/v1/classify", lambda: sixteen_bit_png(4000), "image/png", 200),
    ("/v1/classify", lambda: transparent_palette_png(5800), "image/png", 200),  # 185 MB of the 192 MB
    ("/v1/classify", lambda: rgba_png(4600), "image/png", 200),  # 186 MB
    ("/v1/detect/attention", lambda: png_header_only(1, 40_000_000), "image/png", 413),
]  # fmt: skip
HEAVY_IDS = ["1M JSON images", "2M floats", "262k floats", "3M values to generate", "64 images of 512x512",
             "16-bit 16 Mpx", "palette with transparency, 34 Mpx", "RGBA 21 Mpx", "1 x 40M"]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "content_type", "status"), HEAVY, ids=HEAVY_IDS)
def test_no_single_request_stalls_the_loop(
    bomb_server: Server, path: str, body: Callable[[], str | bytes], content_type: str, status: int
) -> None:
    """Millions of JSON values are refused before parsing (they held the loop for 0.8 s); what is
    parsed, decoded or drawn, big tensors and many PNGs included, is worked on off the event loop."""
    content = body()  # made before the probe starts: json.dumps holds this process's interpreter lock
    with LivenessProbe(bomb_server.url) as probe:
        time.sleep(0.1)
        response = httpx2.post(f"{bomb_server.url}{path}", timeout=60, content=content,
                               headers={"content-type": content_type})  # fmt: skip
        time.sleep(0.1)
    assert response.status_code == status, response.text[:300]
    print(f"{path}: slowest /health/live {probe.slowest:.3f} s")
    assert probe.slowest < 0.5
