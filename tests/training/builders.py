"""Tiny data sets on disk, in the layouts `--data` takes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.data import load_digits_data
from export.scenes import SceneConfig, write_coco

# three colour classes a model can tell apart after a few steps: red, green and blue dominant
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def image_folder(root: Path, per_class: int = 10, size: tuple[int, int] = (24, 20), seed: int = 0) -> Path:
    """`root/<colour>/<n>.png`: noisy RGB images (width x height `size`), one folder per class."""
    rng = np.random.default_rng(seed)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for n in range(per_class):
            noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
            pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / name / f"{n}.png")
    return root


def coco_folder(root: Path, train: int = 24, held_out: int = 8) -> Path:
    """`root/{train,held_out}/annotations.json` with `images/` beside each: small digit scenes."""
    data = load_digits_data(seed=0)
    cfg = SceneConfig(canvas=(32, 48), digit_size=(12, 16), max_digits=2)
    write_coco(root / "train", data.train, data.classes, train, seed=0, cfg=cfg, desc="train")
    write_coco(root / "held_out", data.held_out, data.classes, held_out, seed=1, cfg=cfg, desc="held out")
    return root


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: the same numbers on every machine (export does not need it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
