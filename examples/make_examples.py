"""`python -m examples.make_examples` writes the images the README's curl commands use: two
held-out digits, enlarged (one light-on-dark as in the data set, one dark-on-light as people write)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

from export.data import load_digits_data

HERE = Path(__file__).parent


def main() -> None:
    held_out = load_digits_data(seed=0).held_out
    for digit, invert in ((7, False), (3, True)):
        index = list(held_out.labels).index(digit)
        image = held_out.images[index].resize((128, 128), Image.Resampling.BICUBIC)
        (ImageOps.invert(image) if invert else image).save(HERE / f"digit-{digit}.png")


if __name__ == "__main__":
    main()
