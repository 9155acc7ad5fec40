"""Issue 25, items 4 and 6: the heaviest renders the limits allow keep the event loop free, and what
a hostile request takes comes back to the system.

Before (this machine, 2 shared cores): one attention render at the largest allowed size (a 62x62
image at scale=64: 15.7 Mpx) held /health/live 64-82 ms (Pillow's blend holds the interpreter's lock
for all it is given), and four clients looping them 154 ms, after which 187 MiB stayed resident: each
image thread's glibc arena kept its free top (the trim threshold was 64 MB, an arena's whole size)."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx2
import numpy as np
import pytest
from PIL import Image

from service import attention
from service.attention import _VIRIDIS, heatmap, overlay, to_unit
from service.settings import PROJECT_ROOT
from tests.e2e.conftest import Server, running_server
from tests.hostile.test_bombs import LivenessProbe, memory_kb


def test_the_overlay_blended_by_bands_is_one_blend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands of rows, and the colour map as a palette: pixel for pixel the single blend over the
    numpy-indexed colour map it replaces."""
    rng = np.random.default_rng(0)
    monkeypatch.setattr(attention, "BAND_PIXELS", 1000)
    for mode, (width, height) in [("L", (37, 29)), ("RGB", (300, 701)), ("L", (1500, 80))]:
        shape = (height, width, 3) if mode == "RGB" else (height, width)
        image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        values = rng.random((8, 8))
        grey = Image.fromarray((to_unit(values) * 255).round().astype(np.uint8), mode="L")
        indexed = Image.fromarray(_VIRIDIS[np.asarray(grey.resize(image.size, Image.Resampling.BILINEAR))], "RGB")
        assert np.array_equal(np.asarray(heatmap(values, image.size)), np.asarray(indexed))
        whole = Image.blend(image.convert("RGB"), indexed, 0.55)
        assert np.array_equal(np.asarray(overlay(image, values)), np.asarray(whole)), (mode, width, height)


ARENAS = """
import ctypes, threading, time
from service.memory import give_back_big_blocks
assert give_back_big_blocks()

def kb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:"))

def churn():  # what a render's thread does: tens of MB in blocks under the mmap threshold, then freed
    blocks = [bytearray(65536) for _ in range(900)]
    del blocks

rest = kb()
for _ in range(3):
    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
print(rest, kb())
"""


def test_what_image_threads_free_goes_back_to_the_system() -> None:
    """Four threads each take and free 59 MB in 64 KB blocks (a picture's bytes in Pillow's chunks):
    each thread's arena gives its free top back beyond 8 MB (glibc keeps up to the trim threshold,
    which had been 64 MB: an arena's whole size, so nothing came back: +230 MB)."""
    run = subprocess.run([sys.executable, "-c", ARENAS], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    rest, after = map(int, run.stdout.split())
    print(f"resident at rest {rest / 1024:.0f} MiB, after the churn {after / 1024:.0f} MiB")
    assert (after - rest) / 1024 < 4 * 8 + 20  # at most the trim threshold kept per arena


@pytest.fixture(scope="module")
def render_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("renders")) as server:
        yield server


def largest_render() -> tuple[str, bytes]:
    """The heaviest picture the limits allow one request to have drawn: 62x62 at scale 64, 15.7 Mpx."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (62, 62), dtype=np.uint8), "L").save(out, "PNG")
    return "/v1/classify/attention?render=true&scale=64", out.getvalue()


def test_the_heaviest_renders_keep_the_loop_free_and_give_their_memory_back(render_server: Server) -> None:
    """Four clients looping the largest render: /health/live answers throughout (measured: 57-60 ms at
    worst, 154 ms before; the issue asks under 250 ms), and 3 s after, resident memory is back within
    100 MiB of where it was (measured: +5 MiB; +187 MiB before)."""
    path, image = largest_render()
    pid = render_server.process.pid
    rest = memory_kb(pid, "VmRSS") / 1024

    def loop(_: int) -> list[int]:
        with httpx2.Client(timeout=60) as client:
            return [client.post(f"{render_server.url}{path}", content=image,
                                headers={"content-type": "image/png"}).status_code for _ in range(3)]  # fmt: skip

    with LivenessProbe(render_server.url) as probe, ThreadPoolExecutor(4) as pool:
        statuses = [status for run in pool.map(loop, range(4)) for status in run]
    assert statuses == [200] * 12
    time.sleep(3)
    kept = memory_kb(pid, "VmRSS") / 1024 - rest
    print(f"slowest /health/live {probe.slowest * 1000:.0f} ms; kept {kept:.0f} MiB")
    assert probe.answers > 10 and probe.slowest < 0.5  # generous for a loaded machine
    assert kept < 100
