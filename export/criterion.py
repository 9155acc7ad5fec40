"""DETR's set criterion: classification with a down-weighted "no object", L1 and GIoU box losses on
matched pairs, summed over the final and every auxiliary decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from export.boxes import cxcywh_to_xyxy, generalized_iou
from export.matcher import HungarianMatcher


class SetCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        no_object_weight: float = 0.1,
        class_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"class": class_weight, "l1": l1_weight, "giou": giou_weight}
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights)

    def layer_losses(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Losses of one decoder layer's predictions (`[batch, queries, ...]`)."""
        matches = self.matcher(logits, boxes, targets)
        batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)])
        query_idx = torch.cat([q for q, _ in matches])
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64)
        target_classes[batch_idx, query_idx] = torch.cat(
            [t["labels"][j] for t, (_, j) in zip(targets, matches, strict=True)]
        )
        class_loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=self.class_weights)

        num_boxes = max(sum(len(t["labels"]) for t in targets), 1)
        matched = boxes[batch_idx, query_idx]
        wanted = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, matches, strict=True)])
        l1 = F.l1_loss(matched, wanted, reduction="sum") / num_boxes
        giou = generalized_iou(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(wanted)).diagonal()
        return {"class": class_loss, "l1": l1, "giou": (1 - giou).sum() / num_boxes}

    def forward(
        self, outputs: dict[str, torch.Tensor | list[dict[str, torch.Tensor]]], targets: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted total over the final and auxiliary layers, and the final layer's terms."""
        layers = [{"logits": outputs["logits"], "boxes": outputs["boxes"]}, *outputs.get("aux", [])]  # type: ignore[list-item]
        total = torch.zeros(())
        final: dict[str, float] = {}
        for depth, layer in enumerate(layers):
            losses = self.layer_losses(layer["logits"], layer["boxes"], targets)  # type: ignore[index]
            total = total + sum(self.weights[k] * v for k, v in losses.items())
            if depth == 0:
                final = {k: v.item() for k, v in losses.items()}
        return total, final
