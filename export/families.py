"""Every model family trained here, by the name `python -m export NAME` takes. Adding one: a module
that declares its FAMILY (export/family.py), and one entry here."""

from __future__ import annotations

from export import detr, image_transformer, vit
from export.family import TrainedFamily

FAMILIES: dict[str, TrainedFamily] = {
    vit.FAMILY.name: vit.FAMILY,
    detr.FAMILY.name: detr.FAMILY,
    image_transformer.FAMILY.name: image_transformer.FAMILY,
}
