"""The Image Transformer's masking, local window and cache; the sampler; the bits-per-dim baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from export.image_transformer import bits_per_dim, marginal_baseline
from models.image_transformer import ImageTransformer, ImageTransformerConfig
from service.sampling import choose

CFG = ImageTransformerConfig(dim=32, heads=2, layers=2, mlp_dim=64, memory=10, dropout=0.0)


@pytest.fixture(scope="module")
def model() -> ImageTransformer:
    torch.manual_seed(0)
    return ImageTransformer(CFG).eval()


def logits_of(model: ImageTransformer, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(pixels, labels)
    assert isinstance(out, torch.Tensor)
    return out


def test_a_later_pixel_never_changes_earlier_logits(model: ImageTransformer) -> None:
    pixels = torch.randint(0, CFG.levels, (1, CFG.length))
    labels = torch.tensor([3])
    base = logits_of(model, pixels, labels)
    for t in (0, 5, 30, 63):
        changed = pixels.clone()
        changed[0, t] = (changed[0, t] + 7) % CFG.levels
        out = logits_of(model, changed, labels)
        # position t predicts pixel t from pixels < t: positions <= t are unaffected
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        if t + 1 < CFG.length:
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_attention_is_local(model: ImageTransformer) -> None:
    """Position t sees only pixels t-memory .. t-1 (through inputs t-memory+1 .. t)."""
    pixels = torch.randint(0, CFG.levels, (1, CFG.length))
    labels = torch.tensor([1])
    _, attention = model(pixels, labels, return_attention=True)
    offsets = torch.arange(CFG.length)[:, None] - torch.arange(CFG.length)[None, :]
    outside = (offsets < 0) | (offsets >= CFG.memory)
    assert attention[..., outside].abs().max() == 0
    torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))


def test_cached_steps_give_the_full_sequence_logits(model: ImageTransformer) -> None:
    pixels = torch.randint(0, CFG.levels, (3, CFG.length))
    labels = torch.tensor([0, 9, CFG.num_classes])  # the last is unconditional
    full = logits_of(model, pixels, labels)
    cache, previous, steps = model.empty_cache(3), torch.full((3,), CFG.levels), []
    with torch.no_grad():
        for t in range(CFG.length):
            logits, cache = model.step(previous, torch.full((3,), t), labels, cache)
            steps.append(logits)
            previous = pixels[:, t]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=0)


def test_bits_per_dim_and_the_marginal_baseline() -> None:
    pixels = torch.tensor([[0, 1], [0, 1], [0, 2]])
    labels = torch.tensor([0, 0, 1])
    log_probs = marginal_baseline(pixels, labels, levels=3, classes=2)
    # class 0, pixel 1: counts (1, 1+2, 1) with add-one smoothing
    torch.testing.assert_close(log_probs[0, 1].exp(), torch.tensor([0.2, 0.6, 0.2]))
    uniform = torch.full((3, 2, 3), math.log(1 / 3))
    assert bits_per_dim(uniform, pixels) == pytest.approx(math.log2(3))


def test_choose_respects_top_k_temperature_and_seed() -> None:
    logits = np.array([[0.0, 1.0, 5.0, 2.0]] * 500)
    greedy = choose(logits, np.random.default_rng(0), temperature=1.0, top_k=1)
    assert (greedy == 2).all()
    top2 = choose(logits, np.random.default_rng(0), temperature=1.0, top_k=2)
    assert set(top2.tolist()) <= {2, 3}
    cold = choose(logits, np.random.default_rng(0), temperature=0.05, top_k=None)
    assert (cold == 2).all()
    a, b = (choose(logits, np.random.default_rng(7), 1.0, None) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert len(set(choose(logits, np.random.default_rng(7), 3.0, None).tolist())) == 4


def test_images_at_different_positions_share_a_step(model: ImageTransformer) -> None:
    """Two images, one a few pixels ahead of the other, stepped together give each its own logits."""
    pixels = torch.randint(0, CFG.levels, (2, CFG.length))
    labels = torch.tensor([2, 5])
    full = logits_of(model, pixels, labels)
    lead = 5
    cache, steps = model.empty_cache(2), {0: [], 1: []}
    with torch.no_grad():
        for t in range(CFG.length - lead):
            position = torch.tensor([t + lead, t]) if t else torch.tensor([0, 0])
            if t == 0:  # bring image 0 forward alone first
                single = [c[:1] for c in cache]
                for u in range(lead):
                    prev = torch.tensor([CFG.levels]) if u == 0 else pixels[:1, u - 1]
                    logits, single = model.step(prev, torch.tensor([u]), labels[:1], single)
                    steps[0].append(logits[0])
                cache = [torch.cat([a, b[1:]]) for a, b in zip(single, cache, strict=True)]
                position = torch.tensor([lead, 0])
            previous = torch.stack([pixels[0, position[0] - 1], pixels[1, t - 1] if t else torch.tensor(CFG.levels)])
            logits, cache = model.step(previous, position, labels, cache)
            steps[0].append(logits[0])
            steps[1].append(logits[1])
    torch.testing.assert_close(torch.stack(steps[0]), full[0, : CFG.length], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(steps[1]), full[1, : CFG.length - lead], atol=1e-5, rtol=0)
