"""Classification data: scikit-learn's bundled digits, or any ImageFolder (one sub-folder per class).

Both give decoded PIL images; the service's own preprocessing turns them into tensors, so the model
trains on exactly what the service will feed it. Torch-free, so tests can rebuild the split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from service.imaging import decode_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DIGITS_HELD_OUT = 360  # of 1,797 (20%), stratified


@dataclass
class Split:
    images: list[Image.Image]
    labels: np.ndarray  # int64 class indices


@dataclass
class LabelledData:
    classes: list[str]
    train: Split
    held_out: Split
    description: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # what export.vit.load_data reloads it from


def digit_image(pixels: np.ndarray) -> Image.Image:
    """An 8x8 digits array (0..16, ink high) -> an 8-bit greyscale image, white ink on black."""
    return Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")


def _split(images: list[Image.Image], labels: np.ndarray, held_out: int | float, seed: int) -> tuple[Split, Split]:
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=held_out, stratify=labels, random_state=seed
    )
    pick = lambda idx: Split([images[i] for i in idx], labels[idx])  # noqa: E731
    return pick(np.sort(train_idx)), pick(np.sort(test_idx))


def load_digits_data(seed: int = 0) -> LabelledData:
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    images = [digit_image(p) for p in digits.images]
    train, held_out = _split(images, labels, DIGITS_HELD_OUT, seed)
    return LabelledData(
        classes=[str(c) for c in digits.target_names],
        train=train,
        held_out=held_out,
        source={"kind": "digits", "seed": seed},
        description={
            "name": "scikit-learn digits (sklearn.datasets.load_digits)",
            "images": len(labels),
            "train": len(train.labels),
            "held_out": len(held_out.labels),
            "split": f"stratified, seed {seed}",
            "native_size": [8, 8],
        },
    )


def load_image_folder(root: Path, seed: int = 0, held_out_fraction: float = 0.2) -> LabelledData:
    """`root/<class>/<image>`; a stratified seeded split holds out `held_out_fraction`."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least two class sub-folders")
    images: list[Image.Image] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(decode_image(path.read_bytes(), max_pixels=10**9))
                labels.append(index)
    train, held_out = _split(images, np.asarray(labels, dtype=np.int64), held_out_fraction, seed)
    return LabelledData(
        classes=classes,
        train=train,
        held_out=held_out,
        source={"kind": "folder", "path": str(root.resolve()), "seed": seed},
        description={
            "name": f"ImageFolder {root}",
            "images": len(labels),
            "train": len(train.labels),
            "held_out": len(held_out.labels),
            "split": f"stratified {held_out_fraction:.0%} held out, seed {seed}",
        },
    )
