"""The photo workload: scikit-learn's two sample photos (427x640), enlarged to 1920x1440 (Lanczos) and
saved as JPEG quality 90, the size a phone uploads. They go to the service's and the plain endpoint's
/v1/classify and /v1/detect; and, in this process, the plain way to get a model input from one (a full
Pillow decode, convert, resize, normalise: bench.peers.recipe.pixels) is timed to set against the
service's own `decode` + `preprocess` stages for the same photos, read from its Server-Timing header.
Whether the service decodes at reduced scale (Pillow's draft mode) shows in that ratio."""

from __future__ import annotations

import io
import statistics

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from bench.common import interleaved
from bench.peers.recipe import manifest, pixels

SIZE = (1920, 1440)
TASKS = {"classify": "vit", "detect": "detr"}  # route -> model
VARIED = ((480, 360), (640, 480), (800, 600), (1024, 768), (1280, 960))  # the real-size workloads' photos


def photos() -> list[bytes]:
    return [jpeg(Image.fromarray(array).resize(SIZE, Image.Resampling.LANCZOS))
            for array in load_sample_images().images]  # fmt: skip


def varied() -> list[bytes]:
    """Both sample photos cropped to 4:3 (568x426 from the left) and resized (Lanczos) to each of VARIED,
    the sizes cameras and phones send, JPEG quality 90: ten photos, the two alternating."""
    crops = [Image.fromarray(array).crop((0, 0, 568, 426)) for array in load_sample_images().images]
    return [jpeg(crop.resize(size, Image.Resampling.LANCZOS)) for size in VARIED for crop in crops]


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pillow_ms(jpegs: list[bytes], repeats: int = 10) -> dict[str, float]:
    """Per task, median ms of the plain full decode + preprocessing of one photo (both photos take turns)."""
    preps = {task: manifest(model)["preprocessing"] for task, model in TASKS.items()}
    runs = {
        f"{task} {i}": (lambda d=data, p=prep: pixels(d, p))
        for task, prep in preps.items()
        for i, data in enumerate(jpegs)
    }
    seconds = interleaved(runs, repeats)
    return {task: 1000 * statistics.median(s for name, s in seconds.items() if name.startswith(task)) for task in TASKS}


def stage_ms(stages: list[dict[str, float]]) -> tuple[float, float, float]:
    """Median ms over the service's answers of its decode, its preprocess, and the two together (nan
    where the header lacks them)."""
    decode = np.array([s.get("decode", np.nan) for s in stages] or [np.nan])
    preprocess = np.array([s.get("preprocess", np.nan) for s in stages] or [np.nan])
    return float(np.median(decode)), float(np.median(preprocess)), float(np.median(decode + preprocess))
