"""Attention rollout against an independent plain-numpy reference, and the overlay pictures."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.attention import overlay, rollout
from service.imaging import encode_png


def random_attention(rng: np.random.Generator, layers: int, heads: int, n: int) -> np.ndarray:
    scores = rng.normal(size=(layers, heads, n, n)) * 2
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference_rollout(attention: np.ndarray, fusion: str, discard_ratio: float) -> np.ndarray:
    """Written out loop by loop from Abnar & Zuidema, with a per-row normalisation done by hand."""
    layers, heads, n, _ = attention.shape
    joint = np.identity(n)
    for l in range(layers):  # noqa: E741
        fused = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                values = [attention[l, h, i, j] for h in range(heads)]
                fused[i, j] = {"mean": sum(values) / heads, "max": max(values), "min": min(values)}[fusion]
        if discard_ratio:
            off = sorted(fused[i, j] for i in range(n) for j in range(n) if i != j)
            cutoff = np.quantile(off, discard_ratio)
            for i in range(n):
                for j in range(n):
                    if i != j and fused[i, j] < cutoff:
                        fused[i, j] = 0.0
        with_residual = fused + np.identity(n)
        for i in range(n):
            total = sum(with_residual[i])
            for j in range(n):
                with_residual[i, j] /= total
        joint = with_residual @ joint
    return joint


@pytest.mark.parametrize(("fusion", "discard"), [("mean", 0.0), ("max", 0.0), ("min", 0.5), ("mean", 0.9)])
def test_rollout_matches_the_reference(fusion: str, discard: float) -> None:
    attention = random_attention(np.random.default_rng(3), layers=3, heads=4, n=7)
    result = rollout(attention, fusion, discard)  # type: ignore[arg-type]
    np.testing.assert_allclose(result, reference_rollout(attention, fusion, discard), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.sum(-1), 1.0)  # still a distribution over input tokens


def test_single_layer_uniform_attention() -> None:
    n = 4
    attention = np.full((1, 2, n, n), 1 / n)
    expected = (np.full((n, n), 1 / n) + np.eye(n)) / 2
    np.testing.assert_allclose(rollout(attention), expected)


def test_overlay_png_decodes_at_the_input_size() -> None:
    image = Image.new("L", (40, 24), 128)
    out = Image.open(io.BytesIO(encode_png(overlay(image, np.arange(16.0).reshape(4, 4)))))
    assert out.size == (40, 24) and out.mode == "RGB"
    pixels = np.asarray(out)
    assert not np.array_equal(pixels[0, 0], pixels[-1, -1])  # low and high ends look different
