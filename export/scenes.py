"""Detection scenes composed from the digits: 1 to `max_digits` digits per canvas at random scale and
place, never overlapping, written as COCO-format JSON plus PNGs (so the same training command takes a
user's own COCO data set).

`python -m export.scenes OUT [--train N] [--held-out N] [--seed N]` writes OUT/{train,held_out}/.
Held-out scenes use only held-out digits (the classification split), so no test digit was trained on.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from export.data import Split, load_digits_data

INK_THRESHOLD = 48  # a pixel brighter than this is ink: the box is the tight box around the ink


@dataclass
class SceneConfig:
    canvas: tuple[int, int] = (64, 128)  # side lengths drawn from this range, independently
    digit_size: tuple[int, int] = (16, 32)  # the 8x8 digit is enlarged to a square of this side
    max_digits: int = 4
    attempts: int = 30  # placements tried per digit before the scene keeps fewer


def ink_box(digit: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight (x0, y0, x1, y1) box, exclusive ends, of the ink in a greyscale array."""
    ys, xs = np.nonzero(digit > INK_THRESHOLD)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 2) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def make_scene(
    digits: Split, rng: np.random.Generator, cfg: SceneConfig
) -> tuple[Image.Image, list[tuple[tuple[int, int, int, int], int]]]:
    """A black canvas with digits pasted in; returns it and [(ink box x0 y0 x1 y1, label)]."""
    width, height = (int(v) for v in rng.integers(cfg.canvas[0], cfg.canvas[1] + 1, size=2))
    canvas = np.zeros((height, width), dtype=np.uint8)
    placed: list[tuple[tuple[int, int, int, int], int]] = []
    for _ in range(int(rng.integers(1, cfg.max_digits + 1))):
        index = int(rng.integers(len(digits.labels)))
        side = int(rng.integers(cfg.digit_size[0], min(cfg.digit_size[1], width, height) + 1))
        digit = np.asarray(digits.images[index].resize((side, side), Image.Resampling.BILINEAR))
        box = ink_box(digit)
        if box is None:
            continue
        for _ in range(cfg.attempts):
            x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
            placed_box = (x + box[0], y + box[1], x + box[2], y + box[3])
            if not any(overlaps(placed_box, other) for other, _ in placed):
                region = canvas[y : y + side, x : x + side]
                np.maximum(region, digit, out=region)
                placed.append((placed_box, int(digits.labels[index])))
                break
    return Image.fromarray(canvas, mode="L"), placed


def write_coco(
    out: Path, digits: Split, classes: list[str], count: int, seed: int, cfg: SceneConfig, desc: str
) -> Path:
    """Writes `out/images/*.png` and `out/annotations.json` (COCO); category ids are 1-based."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    coco: dict[str, Any] = {
        "info": {"description": f"digit scenes, seed {seed}"},
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(classes)],
        "images": [],
        "annotations": [],
    }
    for image_id in tqdm(range(1, count + 1), desc=desc, unit="scene"):
        scene, placed = make_scene(digits, rng, cfg)
        file_name = f"{image_id:06d}.png"
        scene.save(out / "images" / file_name)
        coco["images"].append({"id": image_id, "file_name": file_name, "width": scene.width, "height": scene.height})
        for (x0, y0, x1, y1), label in placed:
            coco["annotations"].append(
                {
                    "id": len(coco["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
            )
    path = out / "annotations.json"
    path.write_text(json.dumps(coco))
    return path


def write_scenes(out: Path, train: int = 6000, held_out: int = 500, seed: int = 0) -> None:
    data = load_digits_data(seed=seed)
    cfg = SceneConfig()
    write_coco(out / "train", data.train, data.classes, train, seed, cfg, "train scenes")
    write_coco(out / "held_out", data.held_out, data.classes, held_out, seed + 1, cfg, "held-out scenes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m export.scenes", description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_scenes(args.out, args.train, args.held_out, args.seed)


if __name__ == "__main__":
    main()
