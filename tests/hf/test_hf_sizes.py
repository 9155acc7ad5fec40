"""The service's copy of transformers' size arithmetic and centre crop, against transformers' own."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image

from service.imaging import centre_crop, resized_size
from service.manifest import Preprocessing

transforms = pytest.importorskip("transformers.image_transforms")

SIDES = [1, 7, 63, 64, 100, 223, 224, 225, 427, 640, 799, 800, 1333, 1920, 4000]


def spec(shortest: int, longest: int | None) -> Preprocessing:
    return Preprocessing(color_mode="RGB", size=(shortest, longest or shortest), resize="shortest_edge",
                         shortest_edge=shortest, longest_edge=longest, mean=[0.5] * 3, std=[0.5] * 3)  # fmt: skip


@pytest.mark.parametrize(("shortest", "longest"), [(800, 1333), (64, 100), (224, None), (256, None), (37, 41)])
def test_shortest_edge_sizes_equal_transformers(shortest: int, longest: int | None) -> None:
    recipe = spec(shortest, longest)
    for width, height in itertools.product(SIDES, SIDES):
        if longest is None:
            image = np.zeros((height, width, 1), dtype=np.uint8)
            expected = transforms.get_resize_output_image_size(image, shortest, default_to_square=False,
                                                               input_data_format="channels_last")  # fmt: skip
        else:
            expected = transforms.get_size_with_aspect_ratio((height, width), shortest, longest)
        # where transformers' arithmetic gives a side of 0 (and its resize then fails), the service keeps 1
        assert resized_size(width, height, recipe)[::-1] == tuple(max(1, side) for side in expected), (width, height)


def test_centre_crop_equals_transformers() -> None:
    rng = np.random.default_rng(0)
    for (height, width), crop in itertools.product([(5, 5), (6, 9), (224, 256), (3, 2)], [(4, 4), (5, 8), (224, 224)]):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        ours = np.asarray(centre_crop(Image.fromarray(pixels), crop))
        theirs = transforms.center_crop(pixels, crop, input_data_format="channels_last")
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{(height, width)} -> {crop}")


@pytest.mark.parametrize(("shortest", "longest"), [(800, 1333), (64, 100), (512, 864)])
def test_yolos_sizes_equal_transformers(shortest: int, longest: int) -> None:
    """YolosImageProcessor floors each side to a multiple of 16 (where that gives 0, the service keeps 16)."""
    from transformers.models.yolos.image_processing_pil_yolos import get_size_with_aspect_ratio_yolos

    recipe = spec(shortest, longest).model_copy(update={"size_multiple": 16})
    for width, height in itertools.product(SIDES, SIDES):
        expected = get_size_with_aspect_ratio_yolos((height, width), shortest, longest)
        assert resized_size(width, height, recipe)[::-1] == tuple(max(16, side) for side in expected), (width, height)
