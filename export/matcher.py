"""Bipartite matching of predictions to targets (DETR section 3.1), with scipy's Hungarian solver."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from export.boxes import cxcywh_to_xyxy, generalized_iou


class HungarianMatcher(nn.Module):
    """Matches each target to one query by the cost
    `class_weight * -p(class) + l1_weight * L1(box) + giou_weight * -GIoU(box)`."""

    def __init__(self, class_weight: float = 1.0, l1_weight: float = 5.0, giou_weight: float = 2.0) -> None:
        super().__init__()
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight

    def cost(
        self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """One image: logits `[queries, classes + 1]`, boxes `[queries, 4]`, labels `[targets]`,
        targets `[targets, 4]` (boxes cx, cy, w, h) -> cost `[queries, targets]`."""
        probs = logits.softmax(-1)[:, labels]
        l1 = torch.cdist(boxes, targets, p=1)
        giou = generalized_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets))
        return self.class_weight * -probs + self.l1_weight * l1 + self.giou_weight * -giou

    @torch.no_grad()
    def forward(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits `[batch, queries, classes + 1]`, boxes `[batch, queries, 4]`, one target dict per image
        (`labels` `[n]`, `boxes` `[n, 4]`) -> per image (query indices, target indices), each `[n]`."""
        matches = []
        for image_logits, image_boxes, target in zip(logits, boxes, targets, strict=True):
            cost = self.cost(image_logits, image_boxes, target["labels"], target["boxes"])
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches
