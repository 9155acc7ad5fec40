"""An imported detector keeps each image's own size (free height and width): loading times it on a
square photo of its recipe's typical side, so a heavy one gets every core and batches only as far as
they pay, like a classifier of fixed size (untimed, it ran on one thread of two: half the speed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import service.repository
from service.imaging import resized_size
from service.manifest import GraphSpec, Preprocessing, read_manifest
from service.repository import load_model, typical_side
from service.runtime import every_core
from service.settings import Settings
from service.tasks import TASKS, manifest_checks


def recipe(shortest: int, longest: int | None, multiple: int | None = None) -> Preprocessing:
    return Preprocessing(color_mode="RGB", size=(shortest, longest or shortest), resize="shortest_edge",
                         shortest_edge=shortest, longest_edge=longest, size_multiple=multiple, mean=[0.5] * 3,
                         std=[0.5] * 3)  # fmt: skip


@pytest.mark.parametrize(("shortest", "longest", "multiple"), [(800, 1333, None), (512, 864, 16), (500, 800, 16),
                                                               (224, None, None)])  # fmt: skip
def test_the_typical_side_is_a_square_photos_resized_side(shortest: int, longest: int | None,
                                                           multiple: int | None) -> None:  # fmt: skip
    spec = recipe(shortest, longest, multiple)
    side = typical_side(spec)
    assert side == shortest - shortest % (multiple or 1)  # the shorter side, floored to YOLOS's multiple
    assert (side, side) == resized_size(1000, 1000, spec)


@pytest.mark.parametrize("name", ["hfdetr", "hfyolos"])
def test_a_detector_of_free_size_is_timed_on_its_typical_side(
    name: str, hf_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.repository, "HEAVY_RUN_S", 0.0)  # every run counts as long
    monkeypatch.setattr(service.repository, "BATCH_GAIN", 100.0)  # nothing pays that much: the knee is 1
    shapes: list[tuple[int, ...]] = []
    zeros = service.repository.zeros

    def spied(spec: GraphSpec, batch: int, side: int = 1) -> dict[str, np.ndarray]:
        feeds = zeros(spec, batch, side)
        shapes.append(feeds["pixel_values"].shape)
        return feeds

    monkeypatch.setattr(service.repository, "zeros", spied)
    settings = Settings(model_repository=hf_repository)
    model = load_model(hf_repository / name, settings, manifest_checks(TASKS))
    assert model.state == "ready", model.reason
    side = typical_side(read_manifest(model.path).preprocessing)
    assert side > 1 and (1, 3, side, side) in shapes and (2, 3, side, side) in shapes
    assert model.sessions["main"].get_session_options().intra_op_num_threads == every_core()
    assert model.batchers["main"].policy.max_batch_size == 1 and set(model.batch_rates["main"]) == {1, 2}
