"""What both protocol tests (tritonclient's and KServe's) hold their answers against: /v1's own."""

from __future__ import annotations

from typing import Any

import httpx2
import numpy as np
import pytest

from service.manifest import read_manifest
from service.settings import PROJECT_ROOT
from tests.helpers import held_out_digits, png_bytes

IMAGES, LABELS = held_out_digits()
PNGS = [png_bytes(image) for image in IMAGES[:6]]
SPEC = read_manifest(PROJECT_ROOT / "model_repository" / "vit" / "1").preprocessing


def v1(server: str, route: str, png: bytes) -> list[dict[str, Any]]:
    """The first image's results from a /v1 route."""
    response = httpx2.post(f"{server}{route}", content=png, headers={"content-type": "image/png"})
    result: list[dict[str, Any]] = response.json()["results"][0]
    return result


def assert_logits_agree_with_v1(server: str, logits: np.ndarray) -> None:
    """Raw ViT logits `[len(PNGS), classes]`: their softmax's best label and score are /v1/classify's."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for png, row in zip(PNGS, probs, strict=True):
        best = v1(server, "/v1/classify", png)[0]
        assert str(row.argmax()) == best["label"]
        assert row.max() == pytest.approx(best["score"], abs=1e-5)
