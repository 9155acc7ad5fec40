"""On the shipped DETR: a detection's cross-attention lies on or near its own digit."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from export.data import load_digits_data
from export.scenes import SceneConfig, make_scene
from tests.helpers import png_bytes

SCENES = 40
NEAR = 1  # cells of margin around the box: a cell is 8 input pixels, about a third of a digit


def mass_near_box(attention: np.ndarray, box: dict[str, float], cell: tuple[float, float]) -> float:
    """The share of the query's attention (1 over the whole grid) on cells within NEAR cells of the box."""
    cell_w, cell_h = cell
    col0, col1 = int(box["xmin"] // cell_w) - NEAR, int(box["xmax"] // cell_w) + NEAR
    row0, row1 = int(box["ymin"] // cell_h) - NEAR, int(box["ymax"] // cell_h) + NEAR
    return float(attention[max(row0, 0) : row1 + 1, max(col0, 0) : col1 + 1].sum())


def test_cross_attention_mass_lies_near_the_box(client: TestClient) -> None:
    held_out = load_digits_data(seed=0).held_out
    rng = np.random.default_rng(11)
    shares = []
    for _ in range(SCENES):
        scene, placed = make_scene(held_out, rng, SceneConfig(max_digits=1))
        body = client.post(
            "/v1/detect/attention", content=png_bytes(scene), headers={"content-type": "image/png"}
        ).json()
        detections = body["results"][0]["detections"]
        assert detections, "the shipped DETR found no digit in a single-digit scene"
        best = detections[0]
        shares.append(mass_near_box(np.array(best["attention"]), best["box"], body["cell"]))
    shares_array = np.array(shares)
    print(f"cross-attention share within {NEAR} cell of the box: median {np.median(shares_array):.2f}, "
          f"min {shares_array.min():.2f}, 10th percentile {np.quantile(shares_array, 0.1):.2f}")  # fmt: skip
    # chance level (attention spread evenly) is the box's share of the image: about 15% here;
    # measured median 0.84, 10th percentile 0.69, min 0.56
    assert np.median(shares_array) >= 0.8
    assert np.quantile(shares_array, 0.1) >= 0.65 and shares_array.min() >= 0.5
