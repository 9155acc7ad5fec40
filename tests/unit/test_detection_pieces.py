"""DETR's pieces: box conversions, GIoU, the Hungarian matcher, and the service's numpy post-processing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from export.boxes import cxcywh_to_xyxy, generalized_iou, pairwise_iou, xyxy_to_cxcywh
from export.matcher import HungarianMatcher
from service.manifest import Preprocessing
from service.outputs import detections


def test_box_conversions_round_trip() -> None:
    boxes = torch.rand(20, 4)
    torch.testing.assert_close(xyxy_to_cxcywh(cxcywh_to_xyxy(boxes)), boxes)
    torch.testing.assert_close(
        cxcywh_to_xyxy(torch.tensor([[0.5, 0.5, 0.2, 0.4]])), torch.tensor([[0.4, 0.3, 0.6, 0.7]])
    )


def test_iou_and_giou_on_known_cases() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [4.0, 0.0, 6.0, 2.0]])
    iou, _ = pairwise_iou(a, b)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]]))
    # disjoint boxes: GIoU = -(enclosing - union) / enclosing = -(12 - 8) / 12
    torch.testing.assert_close(generalized_iou(a, b), torch.tensor([[1 / 7 - 2 / 9, 1.0, -1 / 3]]))


def brute_force_cost(cost: np.ndarray) -> float:
    """The cheapest assignment of every target (column) to a distinct query (row), by enumeration."""
    queries, targets = cost.shape
    return min(sum(cost[q, t] for t, q in enumerate(rows)) for rows in itertools.permutations(range(queries), targets))


@pytest.mark.parametrize("seed", range(12))
def test_matcher_finds_the_cheapest_assignment(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    queries, targets, classes = 5, int(torch.randint(1, 5, (1,), generator=gen)), 4
    logits = torch.randn(1, queries, classes + 1, generator=gen)
    boxes = torch.rand(1, queries, 4, generator=gen) * 0.5 + 0.1
    target = {
        "labels": torch.randint(0, classes, (targets,), generator=gen),
        "boxes": torch.rand(targets, 4, generator=gen) * 0.5 + 0.1,
    }
    matcher = HungarianMatcher()
    ((rows, cols),) = matcher(logits, boxes, [target])
    assert len(rows) == targets and len(set(rows.tolist())) == targets and sorted(cols.tolist()) == list(range(targets))
    cost = matcher.cost(logits[0], boxes[0], target["labels"], target["boxes"]).numpy()
    assert cost[rows, cols].sum() == pytest.approx(brute_force_cost(cost), rel=1e-6)


def reference_postprocess(
    logits: torch.Tensor, boxes: torch.Tensor, original: tuple[int, int], inner: tuple[int, int], size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DETR's PostProcess (softmax, drop no-object, best class, cxcywh -> xyxy, scale), then undo
    the letterbox: input pixels -> original pixels."""
    probs = logits.softmax(-1)[:, :-1]
    scores, labels = probs.max(-1)
    xyxy = cxcywh_to_xyxy(boxes) * size
    scale = torch.tensor([inner[0] / original[0], inner[1] / original[1]] * 2)
    return (xyxy / scale).clamp(min=0), scores, labels


def test_numpy_postprocess_matches_the_torch_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(10, 11, generator=gen) * 3, torch.rand(10, 4, generator=gen) * 0.3 + 0.2
    spec = Preprocessing(color_mode="L", size=(96, 96), resize="letterbox", mean=[0], std=[1])
    original = (200, 100)  # letterboxed into 96 x 48
    xyxy, scores, labels, _ = detections(logits.numpy(), boxes.numpy(), original, spec, threshold=0.0, limit=100)
    ref_xyxy, ref_scores, ref_labels = reference_postprocess(logits, boxes, original, (96, 48), 96)
    order = torch.argsort(ref_scores, descending=True)
    np.testing.assert_allclose(scores, ref_scores[order].numpy(), rtol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels[order].numpy())
    expected = np.minimum(ref_xyxy[order].numpy(), [200, 100, 200, 100])
    np.testing.assert_allclose(xyxy, expected, rtol=1e-5, atol=1e-4)


def test_threshold_and_limit() -> None:
    logits = np.full((6, 3), -10.0)
    logits[np.arange(6), np.arange(6) % 2] = np.linspace(0, 10, 6)  # rising confidence
    boxes = np.tile([0.5, 0.5, 0.2, 0.2], (6, 1))
    spec = Preprocessing(color_mode="L", size=(10, 10), resize="letterbox", mean=[0], std=[1])
    scores = detections(logits, boxes, (10, 10), spec, threshold=0.9, limit=100).scores
    assert (scores >= 0.9).all() and list(scores) == sorted(scores, reverse=True)
    assert len(detections(logits, boxes, (10, 10), spec, threshold=0.0, limit=2).scores) == 2
