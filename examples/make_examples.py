"""`python -m examples.make_examples` writes the images the README's curl commands use: two
held-out digits, enlarged (one light-on-dark as in the data set, one dark-on-light as people write),
and a scene of held-out digits for detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from export.data import load_digits_data
from export.scenes import SceneConfig, make_scene

HERE = Path(__file__).parent


def main() -> None:
    held_out = load_digits_data(seed=0).held_out
    for digit, invert in ((7, False), (3, True)):
        index = list(held_out.labels).index(digit)
        image = held_out.images[index].resize((128, 128), Image.Resampling.BICUBIC)
        (ImageOps.invert(image) if invert else image).save(HERE / f"digit-{digit}.png")
    for seed in range(100):  # the first seed that gives a scene worth looking at (4 digits)
        scene, placed = make_scene(held_out, np.random.default_rng(seed), SceneConfig())
        if len(placed) == 4:
            break
    scene.save(HERE / "scene.png")


if __name__ == "__main__":
    main()
