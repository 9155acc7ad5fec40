"""DETR's matcher costs and set criterion against values worked out by hand (boxes are cx, cy, w, h)."""

from __future__ import annotations

import math

import pytest
import torch

from export.criterion import SetCriterion
from export.matcher import HungarianMatcher

LN2, LN3 = math.log(2), math.log(3)
# 2 classes and "no object" (index 2)
TARGET = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.6, 0.2, 0.2]])}


def test_matcher_costs_by_hand() -> None:
    """Weights class 2, L1 3, GIoU 4, so a term with the wrong weight shows."""
    logits = torch.tensor([[0.0, LN3, 0.0], [LN3, 0.0, 0.0]])  # softmax (.2, .6, .2) and (.6, .2, .2)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.6, 0.2, 0.2]])
    targets = {"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.5, 0.6, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]])}
    # query 0 vs target 0: p .6, L1 .1, IoU .02/.06 = 1/3 with the enclosing box equal to the union
    # query 0 vs target 1: p .2, L1 .6, disjoint: GIoU = -(.25 - .08) / .25 = -.68
    # query 1 vs target 0: p .2, the same box: L1 0, GIoU 1
    # query 1 vs target 1: p .6, L1 .7, GIoU = -(.30 - .08) / .30
    expected = torch.tensor(
        [
            [2 * -0.6 + 3 * 0.1 - 4 / 3, 2 * -0.2 + 3 * 0.6 + 4 * 0.68],
            [2 * -0.2 + 3 * 0.0 - 4 * 1.0, 2 * -0.6 + 3 * 0.7 + 4 * 0.22 / 0.30],
        ]
    )
    matcher = HungarianMatcher(class_weight=2.0, l1_weight=3.0, giou_weight=4.0)
    cost = matcher.cost(logits, boxes, targets["labels"], targets["boxes"])
    torch.testing.assert_close(cost, expected, atol=1e-5, rtol=0)
    # the cheaper assignment crosses over: 4.12 - 4.4 = -0.28 against -2.23 + 3.83 = 1.6
    ((rows, cols),) = matcher(logits[None], boxes[None], [targets])
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]


def layer(near: list[float]) -> dict[str, torch.Tensor]:
    """Three queries: one far, one at `near`, one far and confident there is no object."""
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, LN2, 0.0], [0.0, 0.0, LN2]]])
    boxes = torch.tensor([[[0.2, 0.2, 0.2, 0.2], near, [0.8, 0.8, 0.2, 0.2]]])
    return {"logits": logits, "boxes": boxes}


# query 1 matches; the others should say "no object": -log p = ln 3 (query 0), ln 2 (queries 1, 2)
CLASS_LOSS = (0.1 * LN3 + 1.0 * LN2 + 0.1 * LN2) / (0.1 + 1.0 + 0.1)  # weighted mean, no-object weight 0.1


def test_set_criterion_terms_by_hand() -> None:
    criterion = SetCriterion(2, HungarianMatcher(), no_object_weight=0.1, class_weight=5, l1_weight=5, giou_weight=2)
    total, final = criterion(layer([0.5, 0.5, 0.2, 0.2]), [TARGET])
    assert final == pytest.approx({"class": CLASS_LOSS, "l1": 0.1, "giou": 1 - 1 / 3}, abs=1e-6)
    assert total.item() == pytest.approx(5 * CLASS_LOSS + 5 * 0.1 + 2 * (2 / 3), abs=1e-5)


def test_no_object_weight_enters_the_class_loss() -> None:
    criterion = SetCriterion(2, HungarianMatcher(), no_object_weight=1.0)
    _, final = criterion(layer([0.5, 0.5, 0.2, 0.2]), [TARGET])
    assert final["class"] == pytest.approx((LN3 + 2 * LN2) / 3, abs=1e-6)


def test_auxiliary_layers_add_their_own_losses() -> None:
    """An auxiliary layer whose matched box is exact adds only its class loss; `final` stays the last layer's."""
    criterion = SetCriterion(2, HungarianMatcher(), no_object_weight=0.1, class_weight=5, l1_weight=5, giou_weight=2)
    outputs = {**layer([0.5, 0.5, 0.2, 0.2]), "aux": [layer([0.5, 0.6, 0.2, 0.2])]}
    total, final = criterion(outputs, [TARGET])
    assert final["l1"] == pytest.approx(0.1, abs=1e-6)
    assert total.item() == pytest.approx(2 * 5 * CLASS_LOSS + 5 * 0.1 + 2 * (2 / 3), abs=1e-5)


def test_box_losses_are_averaged_over_all_targets_of_the_batch() -> None:
    criterion = SetCriterion(2, HungarianMatcher())
    two = {k: torch.cat([v, v]) for k, v in layer([0.5, 0.5, 0.2, 0.2]).items()}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    _, final = criterion(two, [TARGET, empty])  # one box in all: its L1 over one, not two images
    assert final["l1"] == pytest.approx(0.1, abs=1e-6) and final["giou"] == pytest.approx(2 / 3, abs=1e-6)


def test_the_loss_gradient_pulls_the_matched_box_towards_its_target() -> None:
    outputs = layer([0.5, 0.5, 0.2, 0.2])
    outputs["boxes"].requires_grad_(True)
    total, _ = SetCriterion(2, HungarianMatcher())(outputs, [TARGET])
    total.backward()
    grad = outputs["boxes"].grad
    assert grad is not None and grad[0, 1, 1] < 0  # cy must grow from .5 to .6
    assert grad[0, [0, 2]].abs().max() == 0  # unmatched boxes get no box gradient
